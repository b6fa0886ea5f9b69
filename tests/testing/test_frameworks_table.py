"""The cross-framework table: records measured one process per entry, the markdown made from
them, and docs/frameworks.md holding exactly that markdown (generated, not typed)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from batchnorm.testing import frameworks as fw

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "frameworks.md")


def test_the_doc_table_is_generated_from_the_committed_records():
    records_path = os.path.splitext(DOC)[0] + ".json"
    with open(records_path) as f:
        records = json.load(f)
    assert [r["entry"] for r in records] == [e.name for e in fw.ENTRIES]
    assert fw.generated_block(DOC) == fw.markdown(records)


def test_update_doc_replaces_only_the_generated_block(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{fw.DOC_BEGIN}\nold table\n{fw.DOC_END}\nafter\n")
    fw.update_doc(str(doc), "| new |")
    assert doc.read_text() == f"intro\n{fw.DOC_BEGIN}\n| new |\n{fw.DOC_END}\nafter\n"
    assert fw.generated_block(str(doc)) == "| new |"
    (tmp_path / "bare.md").write_text("no block\n")
    with pytest.raises(ValueError, match="generated block"):
        fw.update_doc(str(tmp_path / "bare.md"), "| new |")


@pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed")
def test_measure_all_records_the_deviation_with_its_mistake_and_upstream_issue():
    records = fw.measure_all(
        ["flax-linen", "flax-linen-two-pass", "keras-tensorflow"], cases="rank2,large-offset"
    )
    default, two_pass, tensorflow = records
    assert default["status"] == two_pass["status"] == "measured"
    assert default["versions"]["flax"] and default["conventions"] == ["keras", "biased"]
    assert (default["cases"], default["failed"], default["errors"]) == (2, 4, 0)
    named = [d for d in default["deviations"] if d["mistake"] == "one_pass"]
    assert len(named) == 1 and named[0]["cases"] == ["large-offset"]
    assert named[0]["worst_ratio"] > 100 and "flax#1491" in named[0]["upstream"]
    assert two_pass["passed"] == two_pass["checks"] == 16 and not two_pass["deviations"]
    if importlib.util.find_spec("tensorflow") is None:
        assert tensorflow["status"] == "not run" and "tensorflow" in tensorflow["reason"]
    else:  # Keras on TensorFlow computes both cases right (measured with keras 3.15.1)
        assert tensorflow["status"] == "measured", tensorflow
        assert tensorflow["passed"] == tensorflow["checks"] == 16, tensorflow
    table = fw.markdown(records)
    assert "`one_pass` (large-offset)" in table and "google/flax#1491" in table
    assert "16/16 in 2 cases" in table


@pytest.mark.skipif(not os.path.exists("/bin/false"), reason="needs /bin/false")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_an_entry_whose_process_fails_is_recorded_as_an_error(monkeypatch):
    monkeypatch.setattr(fw.sys, "executable", "/bin/false")
    (record,) = fw.measure_all(["pytorch-eager"])
    assert record["status"] == "error" and record["entry"] == "pytorch-eager"
    assert "error:" in fw.markdown([record])


def test_unknown_entries_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        fw.main(["--entries", "caffe"])
    assert exc.value.code == 2 and "caffe" in capsys.readouterr().err


def test_importing_the_suite_imports_no_other_framework():
    """The Flax and Keras styles import their framework when built, not before."""
    import subprocess
    import sys

    code = (
        "import sys, batchnorm.testing, batchnorm.testing.frameworks; "
        "print(sorted(m for m in ('jax', 'flax', 'keras', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
