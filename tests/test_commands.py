"""The evaluation command: locomo_eval end to end on a small file, and bad input to it."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from memory.models import Message, User
from tests.locomo_sample import locomo_file


@pytest.mark.django_db(transaction=True)
def test_locomo_eval_reports_recall_and_cleans_up(tmp_path):
    """locomo_eval ingests every turn, asks the non-adversarial questions, reports recall, deletes its users."""
    out = tmp_path / "out.json"

    call_command("locomo_eval", str(locomo_file(tmp_path)), json_out=out)

    report = json.loads(out.read_text())
    assert report["n_questions"] == 2  # category 5 skipped; D9:9 names no turn and is dropped
    assert set(report["recall"]["by_category"]) == {"1", "4"}
    assert report["recall"]["overall"]["5"] == 100.0  # 5 turns: every evidence turn is in the top 5
    assert report["recall"]["by_conversation"] == {"conv-t": report["recall"]["overall"]}
    assert report["n_by_conversation"] == {"conv-t": 2}
    assert report["ingest"]["messages"] == 5
    assert set(report["query_ms"]) == {"p50", "p95"}
    assert not User.objects.filter(name__startswith="locomo-conv-t").exists()
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("speaker_weight, expected", [(None, 1.0), (0.0, 0.0)])
def test_locomo_eval_reports_the_retrieval_settings_it_ran_with(tmp_path, speaker_weight, expected):
    """--speaker-weight overrides SPEAKER_WEIGHT for the run; the JSON says which settings ran."""
    out = tmp_path / "out.json"

    call_command("locomo_eval", str(locomo_file(tmp_path)), json_out=out, speaker_weight=speaker_weight)

    retrieval = json.loads(out.read_text())["retrieval"]
    assert retrieval["speaker_weight"] == expected and retrieval["bm25_weight"] == 3.0


@pytest.mark.django_db(transaction=True)
def test_locomo_eval_keep_stores_turns_with_speaker_date_and_caption(tmp_path):
    """With --keep the turns stay: speaker and caption in metadata, timestamps from the session date."""
    call_command("locomo_eval", str(locomo_file(tmp_path)), keep=True)

    image_turn = Message.objects.get(metadata__locomo_dia_id="D1:3")
    assert image_turn.metadata["speaker"] == "Ann" and image_turn.role == "user"
    assert image_turn.metadata["image_caption"] == "a photo of an orange kitten on a sofa"
    assert "kitten" not in image_turn.content and "orange kitten" in image_turn.index_text
    assert (image_turn.created_at.year, image_turn.created_at.month, image_turn.created_at.day) == (2023, 5, 8)
    assert Message.objects.get(metadata__locomo_dia_id="D2:1").role == "assistant"


@pytest.mark.parametrize(
    "content, message",
    [(None, "path: no such file"), ("not json", "path: cannot read"), ('{"a": 1}', "path: expected a JSON list")],
)
def test_locomo_eval_rejects_bad_files(tmp_path, db, content, message):
    """A missing, unreadable or wrongly shaped file is a command error naming 'path'; nothing is stored."""
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(CommandError, match=message):
        call_command("locomo_eval", str(path))
    assert not User.objects.exists()


@pytest.mark.parametrize(
    "args, option",
    [(["--speaker-weight", "-1"], "--speaker-weight"), (["--bm25-weight", "101"], "--bm25-weight"),
     (["--rrf-k", "0"], "--rrf-k"), (["--bm25-weight", "0", "--vector-weight", "0"], "--vector-weight")],
)
def test_locomo_eval_rejects_bad_retrieval_options(tmp_path, db, args, option):
    """Out-of-range retrieval options are command errors naming the option; nothing is stored."""
    with pytest.raises(CommandError, match=option):
        call_command("locomo_eval", str(locomo_file(tmp_path)), *args)
    assert not User.objects.exists() and not Message.objects.exists()
