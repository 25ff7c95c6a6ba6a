"""Multiple-choice scoring on the real SmolLM2: obvious questions are answered right, the forked,
token-by-token choice log-likelihoods equal a plain dense forward per prefix, the policy acts on the
choice tokens, k-shot draws, and bad task lines are named by file and line."""
from __future__ import annotations

import json

import pytest
import torch

from runner.eval.mc import MCDataError, build_prompts, choice_loglikelihoods, load_questions, score_prompts
from runner.kv.spec import KVSpec
from runner.engines.lm import LM, Batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX = "Answer each question."
OBVIOUS = [  # (input, right choice, wrong choice): a 135M model gets these right by a wide margin
    ("Repeat the phrase: the quick brown fox jumps over the lazy dog",
     "the quick brown fox jumps over the lazy dog", "lamp seventeen wet ruler sings loudly"),
    ("Which sentence is written in correct English?", "The dog ran across the park.", "Park the across ran dog the."),
    ("Which sentence is written in correct English?", "The cat sat on the mat.", "Sat mat cat the on the."),
]


@pytest.fixture(scope="module")
def lm(smollm2_lm) -> LM:
    return smollm2_lm


def write_task(path, right_first: bool) -> str:
    lines = []
    for inp, right, wrong in OBVIOUS:
        choices = [right, wrong] if right_first else [wrong, right]
        lines.append(json.dumps({"input": inp, "choices": choices, "label": 0 if right_first else 1,
                                 "task_prefix": PREFIX}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def prompts_of(path: str, tokenizer, shots: int = 1, seed: int = 0, list_choices: bool = False):
    pool = load_questions(path)
    return build_prompts(pool, pool, tokenizer.encode, shots=shots, seed=seed, add_bos=False,
                         list_choices=list_choices)


@pytest.mark.parametrize("right_first", [True, False])
def test_obvious_choice_wins_whatever_the_order(lm, smollm2_loaded, tmp_path, right_first):
    prompts = prompts_of(write_task(tmp_path / "obvious.jsonl", right_first), smollm2_loaded[2])
    result = score_prompts(lm, prompts, KVSpec().settings(), batch_size=len(prompts))
    assert (result.questions, result.correct, result.correct_norm) == (3, 3, 3)
    assert result.tokens_scored == sum(len(c) for p in prompts for c in p.choice_ids)


def _direct(lm: LM, context: list[int], choice: list[int]) -> float:
    """Sum of log p(choice[j] | context + choice[:j]), each from its own dense prefill."""
    total = 0.0
    with torch.inference_mode():
        for j, token in enumerate(choice):
            logits = Batch(lm, [context + choice[:j]], 1).prefill()[0]
            total += float(torch.log_softmax(logits.double(), -1)[token])
    return total


@pytest.fixture(scope="module")
def zero_shot(smollm2_loaded, tmp_path_factory):
    """0-shot prompts (short contexts keep the per-prefix oracle cheap) and their direct scores."""
    cfg, weights, tok = smollm2_loaded
    lm = LM(cfg, weights, torch.device("cpu"), torch.float32)
    prompts = prompts_of(write_task(tmp_path_factory.mktemp("mc") / "obvious.jsonl", True), tok, shots=0)
    return prompts, [[_direct(lm, p.context_ids, c) for c in p.choice_ids] for p in prompts]


@pytest.mark.parametrize("decode_context", [0, 5])
def test_loglikelihood_equals_dense_forward(lm, zero_shot, decode_context):
    prompts, want = zero_shot
    assert len({len(p.context_ids) for p in prompts}) > 1  # left padding is exercised
    assert len({len(c) for p in prompts for c in p.choice_ids}) > 1  # so are dummy tokens of short choices
    got = choice_loglikelihoods(lm, [p.context_ids for p in prompts], [p.choice_ids for p in prompts],
                                KVSpec().settings(), decode_context=decode_context)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=2e-3)


def test_policy_acts_on_the_choice_tokens(lm, smollm2_loaded, tmp_path):
    prompts = prompts_of(write_task(tmp_path / "obvious.jsonl", True), smollm2_loaded[2])
    args = [p.context_ids for p in prompts], [p.choice_ids for p in prompts]
    dense = torch.tensor(choice_loglikelihoods(lm, *args, KVSpec().settings()))
    sparse = torch.tensor(choice_loglikelihoods(lm, *args, KVSpec(policy="local", sparsity=0.9).settings()))
    assert (dense - sparse).abs().max() > 0.1


def test_shots_are_seeded_and_exclude_the_question(smollm2_loaded, tmp_path):
    path = write_task(tmp_path / "obvious.jsonl", True)
    tok = smollm2_loaded[2]
    first, again = prompts_of(path, tok, shots=2), prompts_of(path, tok, shots=2)
    assert [p.context_ids for p in first] == [p.context_ids for p in again]
    for p, (inp, right, _) in zip(first, OBVIOUS):
        text = tok.decode(p.context_ids)
        assert text.startswith(PREFIX) and text.endswith("\nA:")
        assert text.count(f"Q: {inp}\n") == (2 if inp == OBVIOUS[1][0] else 1)  # two questions share the text
        assert text.count(f"A: {right}") == 0  # its own answer never appears among the shots
        assert "choice:" not in text
    listed = prompts_of(path, tok, shots=2, list_choices=True)
    for p, (inp, right, wrong) in zip(listed, OBVIOUS):
        own = tok.decode(p.context_ids).rsplit("\n\n", 1)[1]  # the question's own block
        assert sorted(own.splitlines()[1:3]) == sorted([f"  choice: {right}", f"  choice: {wrong}"])
        assert tok.decode(p.context_ids).count("  choice: ") == 6
    with pytest.raises(ValueError, match="eval.shots"):
        prompts_of(path, tok, shots=3)


def test_prompts_do_not_depend_on_how_the_path_is_written(tmp_path, monkeypatch):
    """Shots and choice order are seeded by file name and line: the same file through a relative
    path, an absolute one, and a copy in another directory gives the same prompts; `where` (for
    error messages) keeps the path as given."""
    lines = [json.dumps({"input": f"question {i}", "choices": [f"right {i}", f"wrong {i}", f"other {i}", f"else {i}"],
                         "label": 0, "task_prefix": PREFIX}) for i in range(12)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in "ab":
        (tmp_path / d / "task.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def prompts(path: str):
        pool = load_questions(path)
        return build_prompts(pool, pool, encode, shots=3, seed=0, add_bos=False)

    spellings = ["a/task.jsonl", str(tmp_path / "a" / "task.jsonl"), "./a/../a/task.jsonl", "b/task.jsonl"]
    got = [prompts(s) for s in spellings]
    want = [(p.context_ids, p.choice_ids, p.label) for p in got[0]]
    assert len({p.label for p in got[0]}) > 1  # the shuffle moved the right choice off the first place
    for spelling, ps in zip(spellings, got):
        assert [(p.context_ids, p.choice_ids, p.label) for p in ps] == want, spelling
        assert [p.where for p in ps] == [f"{spelling}:{n}" for n in range(1, 13)]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"input": "q", "choices": ["only one"], "label": 0}', "'choices'"),
    ('{"input": "q", "choices": ["a", "b"], "label": 2}', "'label'"),
    ('{"input": 3, "choices": ["a", "b"], "label": 0}', "'input'"),
])
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "task.jsonl"
    good = json.dumps({"input": "q", "choices": ["a", "b"], "label": 0, "task_prefix": ""})
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(MCDataError, match=f"^{path}:3: .*{problem}"):
        load_questions(path)
