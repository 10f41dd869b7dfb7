"""``python -m vapo_pl.demo.prepare``: the ``<cache>/base`` link that ``configs/demo.yaml`` names.

The base-policy build itself (minutes) is tested in test_base_policy.py; here ``ensure_base_policy`` is replaced
by a function that returns a directory, so only the link handling runs."""

from __future__ import annotations

import pytest

from vapo_pl.demo import prepare as prep


@pytest.fixture
def built(tmp_path, monkeypatch):
    targets = []

    def ensure(cache, verbose=False):
        path = cache / f"base-{len(targets)}"
        path.mkdir(parents=True)
        targets.append(path)
        return path

    monkeypatch.setattr(prep, "ensure_base_policy", ensure)
    return targets


def test_link_points_at_the_build_and_moves_to_a_new_one(tmp_path, built, capsys):
    link = prep.prepare(tmp_path)
    assert link == tmp_path / "base" and link.is_symlink() and link.resolve() == built[0].resolve()
    link = prep.prepare(tmp_path)  # a new build (new content hash): the link is replaced in place
    assert link.resolve() == built[1].resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "base-0", "base-1"]  # no temporary link left
    assert "ready in" in capsys.readouterr().out


def test_cached_build_keeps_the_link(tmp_path, monkeypatch, capsys):
    (tmp_path / "base-x").mkdir()
    (tmp_path / "base").symlink_to("base-x")
    monkeypatch.setattr(prep, "ensure_base_policy", lambda cache, verbose=False: cache / "base-x")
    assert prep.prepare(tmp_path).resolve() == (tmp_path / "base-x").resolve()
    assert "(cached" in capsys.readouterr().out


def test_a_real_directory_named_base_is_not_replaced(tmp_path, built):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"base is not a symlink"):
        prep.prepare(tmp_path)
    assert (tmp_path / "base" / "mine.txt").read_text() == "keep"
