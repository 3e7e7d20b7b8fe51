"""CP's side files copied into the output: those fnmatch's patterns pick (one regular expression per list now),
files only, never the index nor the plan."""

from __future__ import annotations

import fnmatch

from chatvec_dist.io.checkpoint import INDEX_NAME, NOT_SIDE_PATTERNS, SIDE_PATTERNS
from chatvec_dist.output.commit import side_files
from chatvec_dist.output.workarea import PLAN_NAME

NAMES = [
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.txt",
    "merges.txt.bak",
    "LICENSE",
    "LICENSE.md",
    "license",  # case matters, as fnmatch on POSIX
    "NOTICE",
    "USE_POLICY.md",
    "modeling_x.py",
    "adapter_config.json",
    "pytorch_model.bin.index.json",
    "model.pt.index.json",
    INDEX_NAME,
    PLAN_NAME,
    "model-00001-of-00002.safetensors",
    "notes.md",
    ".hidden.json",
    "line\nbreak.json",
    "json",
    "weird[.json",
    "x.json.swp",
]


def reference(names: list[str]) -> list[str]:
    return sorted(
        n
        for n in names
        if n not in (INDEX_NAME, PLAN_NAME)
        and any(fnmatch.fnmatch(n, p) for p in SIDE_PATTERNS)
        and not any(fnmatch.fnmatch(n, p) for p in NOT_SIDE_PATTERNS)
    )


def test_side_files_are_the_files_fnmatchs_patterns_pick(tmp_path):
    for name in NAMES:
        (tmp_path / name).write_text("{}")
    (tmp_path / "folder.json").mkdir()  # not a file
    (tmp_path / "link.json").symlink_to(tmp_path / "config.json")  # a link to a file: a file, as before
    found = [p.name for p in side_files(tmp_path)]
    assert found == reference(NAMES + ["link.json"])
    assert "line\nbreak.json" in found and "LICENSE.md" in found and "weird[.json" in found
    assert not {"folder.json", "license", "adapter_config.json", INDEX_NAME, "x.json.swp"} & set(found)
