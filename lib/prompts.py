"""The passkey prompt of Mohtashami & Jaggi (2023), as the PoSE paper shows it in Figure 2a: its texts, one place for
passkey.py (retrieval at a random depth), recall.py (at a fixed distance) and the synthetic episodes of the bundled
model's pretraining and replay (scripts/make_passkey_corpus.py, scripts/make_replay.py)."""

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def prompt_text(key, n_filler, n_before):
    """The task, n_filler sentences of the filler cycle with the key line after the first n_before, the question."""
    sentences = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    parts = [TASK, " ".join(sentences[:n_before]), KEY_LINE.format(key=key), " ".join(sentences[n_before:]), QUESTION]
    return "\n".join(p for p in parts if p)  # no empty line when the key is first or last
