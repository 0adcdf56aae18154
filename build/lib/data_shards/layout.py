"""Where things live inside a prepared dataset folder, and the sample keys inside shards."""
from __future__ import annotations

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ITEM_SHARD_PATTERN = "items/items-%06d.tar"
USER_SHARD_PATTERN = "users/users-%06d.tar"
DALI_INDEX_SUFFIX = ".idx"


def item_key(item_id: int) -> str:
    return f"{item_id:010d}"


def user_key(user_id: int) -> str:
    return f"{user_id:010d}"
