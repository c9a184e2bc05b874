"""OpenWebText preparation tools (tools/openwebtext/): each on small inputs made here.

Library functions are called directly; the CLIs run in-process through ``owt_common.cli`` (the
same wrapper ``__main__`` uses) and, for ``--help`` and one user error, in a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools" / "openwebtext"
sys.path.insert(0, str(TOOLS))

import cleanup_dataset  # noqa: E402
import dedup  # noqa: E402
import filter_urls  # noqa: E402
import shuffle_split  # noqa: E402
import split_sentences  # noqa: E402
from owt_common import cli  # noqa: E402

pytest_plugins = ["data_helpers"]  # demo_paths fixture

ENGLISH = ("The committee met on Tuesday to discuss the new budget for the city library, and "
           "after a long debate the members agreed to extend the opening hours during the winter "
           "months so that students and workers could use the reading rooms in the evening. ")
FRENCH = ("Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque "
          "municipale, et après un long débat les membres ont accepté de prolonger les horaires. ")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(record) for record in records])


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_user_error(capsys, main, argv: list[str], expected: str, tmp_path: Path) -> None:
    """``main`` exits 2 with one line naming ``expected`` and leaves no file behind."""
    before = set(tmp_path.iterdir())
    assert cli(main, argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and expected in error, error
    assert set(tmp_path.iterdir()) == before


# --- filter_urls -------------------------------------------------------------------------------

def test_filter_urls_drops_each_reason_and_keeps_first_occurrence(tmp_path, capsys):
    urls = ["http://Example.com/story/", "https://news.example.org/a?id=1",
            "http://example.com/story#comments", "https://i.imgur.com/abc", "https://youtu.be/x",
            "http://site.com/photo.JPG", "http://site.com/file.tar.gz", "ftp://site.com/doc",
            "http://no host.com/", "not a url", "http://site.com:99999/", "", "http://localhost/"]
    source = write_lines(tmp_path / "urls.txt", urls)
    assert cli(filter_urls.main, ["--input", str(source), "--output", str(tmp_path / "kept.txt"),
                                  "--rejected", str(tmp_path / "rejected.tsv")]) == 0
    assert "kept: 2, malformed: 5, domain: 2, extension: 2, duplicate: 1" in capsys.readouterr().out
    assert (tmp_path / "kept.txt").read_text().split() == urls[:2]
    rejected = dict(line.split("\t") for line in (tmp_path / "rejected.tsv").read_text().splitlines())
    assert rejected["http://example.com/story#comments"] == "duplicate"
    assert rejected["https://i.imgur.com/abc"] == "domain"
    assert rejected["http://site.com/file.tar.gz"] == "extension"
    assert rejected["not a url"] == "malformed"


def test_filter_urls_extra_blacklist_matches_subdomains(tmp_path):
    blacklist = write_lines(tmp_path / "extra.txt", ["# spam hosts", "Spam.Example  # trailing"])
    source = write_lines(tmp_path / "urls.txt", ["http://a.spam.example/x", "http://spam.example/",
                                                 "http://notspam.example/", "http://ham.example/"])
    counts = filter_urls.filter_url_file(str(source), str(tmp_path / "kept.txt"),
                                         extra_blacklist=str(blacklist))
    assert counts["domain"] == 2 and counts["kept"] == 2
    assert filter_urls.normalize_url("HTTP://A.COM:80/x/#f") == "http://a.com:80/x"


def test_filter_urls_missing_blacklist_is_a_user_error(tmp_path, capsys):
    source = write_lines(tmp_path / "urls.txt", ["http://a.com/"])
    assert_user_error(capsys, filter_urls.main,
                      ["--input", str(source), "--output", str(tmp_path / "kept.txt"),
                       "--domain-blacklist", str(tmp_path / "missing.txt")], "missing.txt", tmp_path)


# --- cleanup_dataset ---------------------------------------------------------------------------

def test_cleanup_repairs_text_and_drops_short_and_foreign(tmp_path, capsys):
    mojibake = ENGLISH.replace("students", "studentsâ€™ friends") * 2
    source = write_records(tmp_path / "raw.json", [
        {"text": mojibake, "url": "u1"}, {"text": FRENCH * 2, "url": "u2"},
        {"text": "Too short.", "url": "u3"}, {"text": ENGLISH, "url": "u4"}])
    output = tmp_path / "clean.json"
    assert cli(cleanup_dataset.main, ["--input", str(source), "--output", str(output),
                                      "--min-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "whitespace-separated words" in out
    assert "kept: 2, too_short: 1, not_en: 1, bad_line: 0" in out
    kept = read_records(output)
    assert [record["url"] for record in kept] == ["u1", "u4"]
    assert "students' friends" in kept[0]["text"] and "â€" not in kept[0]["text"]


def test_cleanup_counts_gpt2_tokens_when_given_a_tokenizer(tmp_path, capsys, demo_paths):
    text = "Internationalization, decentralization and counterrevolutionaries. " * 4
    source = write_records(tmp_path / "raw.json", [{"text": text}])
    words = len(text.split())
    config = cleanup_dataset.CleanupConfig(min_tokens=words + 1, lang_threshold=0.01)
    counter = cleanup_dataset.gpt2_token_counter(str(demo_paths["vocab"]), str(demo_paths["merges"]))
    assert counter(text) > words
    by_words = cleanup_dataset.cleanup_file(str(source), str(tmp_path / "a.json"), config)
    by_tokens = cleanup_dataset.cleanup_file(str(source), str(tmp_path / "b.json"), config, counter)
    assert by_words["too_short"] == 1 and by_tokens["kept"] == 1
    cli(cleanup_dataset.main, ["--input", str(source), "--output", str(tmp_path / "c.json"),
                               "--vocab-file", str(demo_paths["vocab"]),
                               "--merge-file", str(demo_paths["merges"])])
    assert "GPT-2 BPE tokens" in capsys.readouterr().out


def test_cleanup_bad_lines_stop_or_are_counted(tmp_path, capsys):
    source = write_lines(tmp_path / "raw.json", [json.dumps({"text": ENGLISH}), "{broken"])
    output = tmp_path / "clean.json"
    assert_user_error(capsys, cleanup_dataset.main, ["--input", str(source), "--output", str(output)],
                      f"{source}:2: malformed JSON", tmp_path)
    counts = cleanup_dataset.cleanup_file(str(source), str(output),
                                          cleanup_dataset.CleanupConfig(min_tokens=1),
                                          skip_bad_lines=True)
    assert counts == {"kept": 1, "too_short": 0, "not_en": 0, "bad_line": 1}
    for threshold in ("0", "1.5"):
        assert_user_error(capsys, cleanup_dataset.main,
                          ["--input", str(source), "--output", str(tmp_path / "x.json"),
                           "--lang-threshold", threshold], f"got {float(threshold)}", tmp_path)


# --- dedup -------------------------------------------------------------------------------------

def corpus_with_duplicates() -> list[dict]:
    other = ("Rain fell over the northern valley for three days, flooding the old mill road and "
             "forcing the farmers to move their cattle to the higher pastures near the forest. ")
    original = ENGLISH + FRENCH + other
    near_copy = original.replace("Tuesday", "Wednesday")
    return [{"url": "a", "text": original}, {"url": "b", "text": other * 2},
            {"url": "c", "text": near_copy}, {"url": "d", "text": other * 2},
            {"url": "e", "text": FRENCH * 2}]


def test_dedup_keeps_first_occurrence_and_reports_duplicates(tmp_path):
    source = write_records(tmp_path / "in.json", corpus_with_duplicates())
    outputs = []
    for run in range(2):
        output, duplicates = tmp_path / f"out{run}.json", tmp_path / f"dup{run}.json"
        counts = dedup.dedup_file(str(source), str(output), str(duplicates), id_key="url")
        assert counts == {"kept": 3, "near_duplicate": 2, "bad_line": 0}
        outputs.append((output.read_bytes(), duplicates.read_bytes()))
    assert outputs[0] == outputs[1]
    assert [record["url"] for record in read_records(tmp_path / "out0.json")] == ["a", "b", "e"]
    found = read_records(tmp_path / "dup0.json")
    assert [(d["id"], d["duplicate_of"]) for d in found] == [("c", "a"), ("d", "b")]
    assert 0.7 <= found[0]["jaccard_estimate"] < 1.0 and found[1]["jaccard_estimate"] == 1.0


def test_dedup_default_ids_are_line_numbers_and_threshold_is_checked(tmp_path, capsys):
    records = corpus_with_duplicates()
    source = write_lines(tmp_path / "in.json", [json.dumps(records[1]), "", json.dumps(records[3])])
    dedup.dedup_file(str(source), str(tmp_path / "out.json"), str(tmp_path / "dup.json"))
    assert read_records(tmp_path / "dup.json")[0]["id"] == 3
    assert read_records(tmp_path / "dup.json")[0]["duplicate_of"] == 1
    for threshold in ("0", "1.01"):
        assert_user_error(capsys, dedup.main,
                          ["--input", str(source), "--output", str(tmp_path / "o.json"),
                           "--duplicates", str(tmp_path / "d.json"), "--threshold", threshold],
                          "--threshold must be in (0, 1]", tmp_path)
    assert_user_error(capsys, dedup.main,
                      ["--input", str(source), "--output", str(tmp_path / "o.json"),
                       "--duplicates", str(tmp_path / "d.json"), "--id-key", "url2"],
                      "no 'url2' field", tmp_path)


# --- shuffle_split -----------------------------------------------------------------------------

def test_shuffle_split_is_deterministic_and_partitions_the_lines(tmp_path):
    lines = [json.dumps({"text": f"document {index}"}) for index in range(200)]
    source = write_lines(tmp_path / "in.json", lines[:100] + [""] + lines[100:])
    counts = shuffle_split.shuffle_split_file(str(source), str(tmp_path / "a"), "80,15,5", seed=7)
    assert counts == {"train": 160, "valid": 30, "test": 10}
    parts = [(tmp_path / f"a_{name}.json").read_text().splitlines() for name in counts]
    assert sorted(sum(parts, [])) == sorted(lines) and parts[0][:5] != lines[:5]
    shuffle_split.shuffle_split_file(str(source), str(tmp_path / "b"), "80,15,5", seed=7)
    shuffle_split.shuffle_split_file(str(source), str(tmp_path / "c"), "80,15,5", seed=8)
    train = {prefix: (tmp_path / f"{prefix}_train.json").read_text() for prefix in "abc"}
    assert train["a"] == train["b"] != train["c"]
    assert shuffle_split.split_bounds(1000, shuffle_split.parse_split("949,50,1")) == [0, 949, 999, 1000]


@pytest.mark.parametrize("split", ["a,b,c", "1,2,3,4", "0,0,0", "-1,2,0", ""])
def test_shuffle_split_rejects_bad_split(tmp_path, capsys, split):
    source = write_lines(tmp_path / "in.json", ['{"text": "x"}'])
    assert_user_error(capsys, shuffle_split.main,
                      ["--input", str(source), "--output-prefix", str(tmp_path / "p"),
                       f"--split={split}"], f"--split {split!r}", tmp_path)


# --- split_sentences ---------------------------------------------------------------------------

def documents_of_sentences(count: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """``count`` documents of five random-word sentences (a newline after the third), and the
    sentences of each. The words before a stop vary, so Punkt learns no abbreviations."""
    rng = random.Random(seed)
    words = ("river garden window teacher market winter letter engine forest kitchen morning "
             "station painter village doctor harbour mountain bridge").split()
    texts, expected = [], []
    for _ in range(count):
        found = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize()
                 + rng.choice(".!?") for _ in range(5)]
        texts.append(" ".join(found[:3]) + "\n" + " ".join(found[3:]))
        expected.append(found)
    return texts, expected


def test_split_sentences_trains_punkt_when_no_model_is_installed(tmp_path, capsys):
    texts, expected = documents_of_sentences(40)
    source = write_records(tmp_path / "in.json", [{"text": t, "id": k} for k, t in enumerate(texts)])
    counts = split_sentences.split_file(str(source), str(tmp_path / "lines.json"))
    pretrained = split_sentences.pretrained_punkt("english", None) is not None
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert len(notices) == (0 if pretrained else 1)
    assert counts == {"documents": 40, "sentences": 200, "bad_line": 0}
    split = read_records(tmp_path / "lines.json")
    assert [record["id"] for record in split] == list(range(40))
    assert [record["text"].split("\n") for record in split] == expected
    split_sentences.split_file(str(source), str(tmp_path / "list.json"), output_format="list")
    listed = read_records(tmp_path / "list.json")
    assert [record["text"] for record in listed] == texts
    assert [record["sentences"] for record in listed] == expected


def test_split_sentences_missing_model_dir_is_a_user_error(tmp_path, capsys):
    source = write_records(tmp_path / "in.json", [{"text": "One. Two."}])
    assert_user_error(capsys, split_sentences.main,
                      ["--input", str(source), "--output", str(tmp_path / "out.json"),
                       "--punkt-model-dir", str(tmp_path / "nltk_data")], "nltk_data", tmp_path)


# --- the scripts as programs -------------------------------------------------------------------

SCRIPT_OUTPUTS = {"filter_urls.py": ["--output", "o"], "cleanup_dataset.py": ["--output", "o"],
                  "dedup.py": ["--output", "o", "--duplicates", "d"],
                  "shuffle_split.py": ["--output-prefix", "p"],
                  "split_sentences.py": ["--output", "o"]}


@pytest.mark.parametrize("script", sorted(SCRIPT_OUTPUTS))
def test_scripts_run_as_programs(tmp_path, script):
    """``--help`` works, and a missing input exits 2 with one line, no traceback, no files."""
    env = {**os.environ, "PYTHONPATH": ""}
    shown = subprocess.run([sys.executable, str(TOOLS / script), "--help"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "--input" in shown.stdout
    outputs = [str(tmp_path / arg) if index % 2 else arg
               for index, arg in enumerate(SCRIPT_OUTPUTS[script])]
    failed = subprocess.run([sys.executable, str(TOOLS / script), "--input",
                             str(tmp_path / "missing.json"), *outputs],
                            capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.count("\n") == 1 and "missing.json" in failed.stderr, failed.stderr
    assert list(tmp_path.iterdir()) == []
