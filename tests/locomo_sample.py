"""A small LoCoMo-format file for the tests of the evaluation and of the benchmarks."""

from __future__ import annotations

import json


def locomo_file(tmp_path):
    """A two-session LoCoMo-format conversation: 5 turns, one image, 3 questions (one category 5)."""
    conversation = {
        "speaker_a": "Ann",
        "speaker_b": "Ben",
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Miso last week."},
            {"speaker": "Ben", "dia_id": "D1:2", "text": "Cute! What colour is she?"},
            {
                "speaker": "Ann",
                "dia_id": "D1:3",
                "text": "She is orange with white paws.",
                "blip_caption": "a photo of an orange kitten on a sofa",
                "img_url": ["x"],
                "query": "kitten",
            },
        ],
        "session_2_date_time": "10:00 am on 20 May, 2023",
        "session_2": [
            {"speaker": "Ben", "dia_id": "D2:1", "text": "I started learning the violin."},
            {"speaker": "Ann", "dia_id": "D2:2", "text": "That is a hard instrument, good luck!"},
        ],
        "session_3_date_time": "9:00 am on 1 June, 2023",  # a date without turns
    }
    qa = [
        {"question": "What is the name of Ann's cat?", "answer": "Miso", "evidence": ["D1:1"], "category": 4},
        {
            "question": "Which instrument is Ben learning?",
            "answer": "violin",
            "evidence": ["D2:1; D9:9"],
            "category": 1,
        },
        {"question": "What is Ann's dog called?", "adversarial_answer": "Rex", "evidence": ["D1:1"], "category": 5},
    ]
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps([{"sample_id": "conv-t", "conversation": conversation, "qa": qa}]))
    return path
