"""MovieLens as GroupLens distributes it: ml-100k (``u.data``, ``u.item``) or ml-1m
(``ratings.dat``, ``movies.dat``), with an optional poster folder named by movie id.
Both are Latin-1 encoded; every rating counts as an interaction (implicit feedback)."""
from __future__ import annotations

from pathlib import Path

from data_shards.problems import DataError, ProblemLog
from data_shards.raw import RawDataset, RawItem
from data_shards.sources.images import ImageFolder
from data_shards.sources.text_lines import BadLineBudget, read_lines

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                 "Thriller", "War", "Western"]
TEXT_FIELDS = ["title", "categories", "year"]


def _split_title(title: str) -> tuple[str, str]:
    """"Toy Story (1995)" -> ("Toy Story", "1995")."""
    title = title.strip()
    if title.endswith(")") and "(" in title:
        head, _, year = title[:-1].rpartition("(")
        if year.isdigit():
            return head.strip(), year
    return title, ""


def _ratings(path: Path, sep: str, problems: ProblemLog):
    users, items, timestamps = [], [], []
    budget = BadLineBudget(path, problems, "malformed_rating_line")
    for number, line in budget.over(read_lines(path, problems, encoding="latin-1")):
        fields = line.split(sep)
        try:
            user, item, _, when = fields
            timestamps.append(float(when))
        except ValueError:
            budget.bad_line(number, f"expected user{sep}item{sep}rating{sep}timestamp: {line[:80]!r}")
            continue
        users.append(user.strip())
        items.append(item.strip())
    return users, items, timestamps


def _ml100k_movies(path: Path, problems: ProblemLog) -> dict[str, RawItem]:
    catalogue = {}
    budget = BadLineBudget(path, problems, "malformed_movie_line")
    for number, line in budget.over(read_lines(path, problems, encoding="latin-1")):
        fields = line.split("|")
        if len(fields) != 5 + len(ML100K_GENRES):
            budget.bad_line(number, f"{len(fields)} fields, expected {5 + len(ML100K_GENRES)}")
            continue
        title, year = _split_title(fields[1])
        genres = [[name] for name, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1"
                  and name != "unknown"]
        catalogue[fields[0]] = RawItem(original_id=fields[0], text_fields={"title": title, "year": year},
                                       categories=genres)
    return catalogue


def _ml1m_movies(path: Path, problems: ProblemLog) -> dict[str, RawItem]:
    catalogue = {}
    budget = BadLineBudget(path, problems, "malformed_movie_line")
    for number, line in budget.over(read_lines(path, problems, encoding="latin-1")):
        fields = line.split("::")
        if len(fields) != 3:
            budget.bad_line(number, f"expected movie::title::genres: {line[:80]!r}")
            continue
        title, year = _split_title(fields[1])
        catalogue[fields[0]] = RawItem(original_id=fields[0], text_fields={"title": title, "year": year},
                                       categories=[[g] for g in fields[2].split("|") if g.strip()])
    return catalogue


def read_movielens(folder: Path, images: Path | None = None) -> RawDataset:
    folder = Path(folder)
    problems = ProblemLog()
    if (folder / "u.data").is_file():
        name, ratings = "ml-100k", _ratings(folder / "u.data", "\t", problems)
        movies = _ml100k_movies(folder / "u.item", problems) if (folder / "u.item").is_file() else {}
    elif (folder / "ratings.dat").is_file():
        name, ratings = "ml-1m", _ratings(folder / "ratings.dat", "::", problems)
        movies = _ml1m_movies(folder / "movies.dat", problems) if (folder / "movies.dat").is_file() else {}
    else:
        raise DataError(f"--input {folder}: neither an ml-100k folder (u.data) nor an ml-1m folder (ratings.dat)")
    users, items, timestamps = ratings
    return RawDataset(
        name=name, description=f"MovieLens {name} from {folder}" + (f", posters from {images}" if images else ""),
        users=users, items=items, timestamps=timestamps, catalogue=movies,
        load_image=ImageFolder(images) if images else None, problems=problems, text_fields=TEXT_FIELDS,
        source={"name": "movielens", "layout": name, "input": str(folder),
                "images": str(images) if images else None})
