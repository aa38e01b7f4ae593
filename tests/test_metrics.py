"""Quality metrics against direct rouge-score/sacrebleu calls and hand cases; the metric rule."""
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from distill import metrics
from distill.errors import UserError
from distill.metrics import METRICS, compute_metrics, pick_main_metric, split_sentences

PREDS = ["the cat sat on the mat today", "a dog barked at the mailman loudly",
         "Stocks fell sharply. Investors were worried."]
REFS = ["the cat was sitting on the mat", "the dog barks at a postman",
        "Investors worried as stocks fell. Markets closed lower."]


def test_keys_and_scale():
    scores = compute_metrics(PREDS, REFS)
    assert set(scores) == set(METRICS)
    assert all(0.0 <= v <= 100.0 for v in scores.values())


def test_matches_direct_library_calls():
    scores = compute_metrics(PREDS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score("\n".join(split_sentences(r)), "\n".join(split_sentences(p)))
              for p, r in zip(PREDS, REFS)]
    for key in ("rouge1", "rouge2", "rougeLsum"):
        expected = 100 * sum(d[key].fmeasure for d in direct) / len(direct)
        assert scores[key] == pytest.approx(expected)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    # stemming is on: "sitting"/"sat" differ, but "barked"/"barks" share the stem "bark"
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert scorer.score(REFS[1], PREDS[1])["rouge1"].fmeasure > \
        plain.score(REFS[1], PREDS[1])["rouge1"].fmeasure


def test_identical_strings_score_100():
    texts = ["the quick brown fox jumps over the lazy dog", "one two three four five six"]
    scores = compute_metrics(texts, list(texts))
    for key in METRICS:
        assert scores[key] == pytest.approx(100.0), key


def test_disjoint_strings_score_0_on_overlap_metrics():
    scores = compute_metrics(["alpha beta gamma delta"], ["one two three four"])
    for key in ("rouge1", "rouge2", "rougeLsum", "bleu", "exact_match"):
        assert scores[key] == 0.0, key


def test_exact_match_counts_after_strip():
    preds = ["  2020-03-01 ", "yes", "no", "Paris"]
    refs = ["2020-03-01", "yes\n", "maybe", "paris"]  # case matters, whitespace does not
    assert compute_metrics(preds, refs)["exact_match"] == pytest.approx(50.0)


def test_rouge_lsum_splits_sentences():
    # Same sentences, other order: one LCS over the whole text keeps only half, the
    # summary-level LCS over sentences keeps all of it.
    scores = compute_metrics(["cats purr loudly. dogs bark often."],
                             ["dogs bark often. cats purr loudly."])
    assert scores["rougeLsum"] == pytest.approx(100.0)
    plain = rouge_scorer.RougeScorer(["rougeL"]).score(
        "dogs bark often. cats purr loudly.", "cats purr loudly. dogs bark often.")
    assert plain["rougeL"].fmeasure < 0.6


def test_regex_sentence_split_without_nltk(monkeypatch):
    monkeypatch.setattr(metrics, "_nltk_split", False)
    assert split_sentences("One here. Two there! Three? ") == ["One here.", "Two there!", "Three?"]
    assert split_sentences("   ") == []


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        compute_metrics([], [])


def test_pick_explicit_and_unknown():
    assert pick_main_metric("bleu", ["x"]) == "bleu"
    with pytest.raises(UserError, match="unknown metric 'rougeX'"):
        pick_main_metric("rougeX", ["x"])


def test_pick_auto_rules():
    short = ["2020-03-01", "March third", "yes", "10 kg"]
    assert pick_main_metric("auto", short) == "exact_match"
    summaries = ["The council approved the budget. Taxes rise next year by two percent.",
                 "A storm hit the coast on Monday, cutting power to thousands of homes."]
    documents = [" ".join(["word"] * 200)] * 2
    assert pick_main_metric("auto", summaries, documents) == "rougeLsum"
    assert pick_main_metric("auto", summaries) == "rougeLsum"  # no sources: a summary by default
    translations = ["Das Haus ist sehr groß und alt.", "Ich trinke gern Kaffee am Morgen."]
    sources = ["The house is very big and old.", "I like to drink coffee in the morning."]
    assert pick_main_metric("auto", translations, sources) == "bleu"
    japanese = ["今日はとても良い天気ですね 本当に", "私は毎朝コーヒーを飲みます とても 好き です"]
    assert pick_main_metric("auto", japanese, sources) == "chrf"


def test_pick_auto_empty_references():
    with pytest.raises(UserError, match="empty"):
        pick_main_metric("auto", [])


def test_cpu_peak_memory_counts_tensors_allocated_in_the_run():
    import torch

    held = [torch.ones(1_000_000)]  # 4 MB allocated before the run

    def run():
        held.clear()  # its free must not lower the level: only the run's own memory counts
        a = torch.ones(2_000_000)  # 8 MB
        b = torch.ones(500_000)  # +2 MB: the peak, 10 MB
        del a, b
        torch.ones(250_000)  # 1 MB after the peak

    peak = metrics._cpu_tensor_peak_bytes(run)
    assert 10_000_000 <= peak < 10_500_000
