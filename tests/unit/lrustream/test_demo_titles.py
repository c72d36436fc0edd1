"""lrustream/demo.py: item titles from the file beside the replay data, and how items are shown with them."""

from __future__ import annotations

from pathlib import Path

from lrustream.demo import format_items, load_titles


def test_movielens_1m_titles_are_read_as_latin_1_skipping_odd_lines(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::2::5::978300760\n")
    (tmp_path / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's\n"
                                          "garbage line\n\n::No id::Drama\n"
                                          "73::Misérables, Les (1995)::Drama\n".encode("latin-1"))
    for data in (tmp_path, tmp_path / "ratings.dat"):  # the folder, or a file in it
        titles, path = load_titles(data)
        assert titles == {"1": "Toy Story (1995)", "73": "Misérables, Les (1995)"}
        assert path == tmp_path / "movies.dat"


def test_movielens_100k_titles_come_from_u_item(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n")
    (tmp_path / "u.item").write_bytes(b"1|Toy Story (1995)|01-Jan-1995||http://x|0|0\n2|GoldenEye (1995)|\n")
    assert load_titles(tmp_path / "u.data") == ({"1": "Toy Story (1995)", "2": "GoldenEye (1995)"},
                                                 tmp_path / "u.item")


def test_without_a_usable_titles_file_items_show_as_ids(tmp_path: Path) -> None:
    assert load_titles(tmp_path / "u.data") == ({}, None)
    assert load_titles(tmp_path / "absent" / "u.data") == ({}, None)
    (tmp_path / "movies.dat").mkdir()  # not a file
    assert load_titles(tmp_path) == ({}, None)
    (tmp_path / "u.item").write_bytes(b"\xff\xfe nothing here\n")
    assert load_titles(tmp_path) == ({}, None)
    assert format_items(["2858", "260"], {}) == "2858, 260"


def test_items_show_with_their_titles_where_known() -> None:
    titles = {"260": "Star Wars (1977)", "1196": "Empire Strikes Back, The (1980)"}
    assert format_items(["260", "42", "1196"], titles) == \
        "260 (Star Wars (1977)), 42, 1196 (Empire Strikes Back, The (1980))"
    assert format_items([], titles) == ""
