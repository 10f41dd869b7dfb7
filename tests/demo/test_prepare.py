"""``python -m vapo_pl.demo.prepare``: the ``<cache>/base`` link that ``configs/demo.yaml`` names.

The base-policy build itself (minutes) is tested in test_base_policy.py; here ``ensure_base_policy`` is replaced
by a function that returns a directory, so only the link handling runs."""

from __future__ import annotations

import pytest

from vapo_pl.demo import prepare as prep


@pytest.fixture
def built(tmp_path, monkeypatch):
    targets = []

    def ensure(cache, spec=None, verbose=False):
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
    monkeypatch.setattr(prep, "ensure_base_policy", lambda cache, spec=None, verbose=False: cache / "base-x")
    assert prep.prepare(tmp_path).resolve() == (tmp_path / "base-x").resolve()
    assert "(cached" in capsys.readouterr().out


def test_a_real_directory_named_base_is_not_replaced(tmp_path, built):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"base is not a symlink"):
        prep.prepare(tmp_path)
    assert (tmp_path / "base" / "mine.txt").read_text() == "keep"


def test_long_task_gets_its_own_link_and_spec(tmp_path, monkeypatch):
    from vapo_pl.demo.long import BASE

    specs = []

    def ensure(cache, spec=None, verbose=False):
        specs.append(spec)
        path = cache / f"base-{len(specs)}"
        path.mkdir(parents=True)
        return path

    monkeypatch.setattr(prep, "ensure_base_policy", ensure)
    assert prep.prepare(tmp_path, task="long") == tmp_path / "base-long"
    assert prep.prepare(tmp_path).name == "base"  # the demo's link is separate
    assert specs[0] == BASE and specs[0].task.max_steps == 15 and specs[1] != BASE
    with pytest.raises(ValueError, match="task must be one of"):
        prep.prepare(tmp_path, task="short")
