"""RewardScorer: sync, async (concurrent) and model reward functions, log_metric / log_extra, reserved columns."""

from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from fusedrl.model.tiny import tiny_word_tokenizer
from fusedrl.train.scoring import RewardScorer, check_dataset_columns

ROWS = [{"prompt": "what is 1 + 1 ?", "answer": "2"}, {"prompt": "what is 2 + 2 ?", "answer": "4"}]
PROMPTS = [row["prompt"] for row in ROWS]
COMPLETIONS = [" 2", " 5"]


def exact(prompts, completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def test_sync_function_gets_columns_and_state():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, answer, log_metric, log_extra):
        seen.update(prompts=prompts, ids=completion_ids, state=trainer_state, answer=answer)
        return [0.5, None]

    rewards = RewardScorer([exact, spy]).score(ROWS, PROMPTS, COMPLETIONS, [[3], [4]], trainer_state="STATE")
    assert rewards[:, 0].tolist() == [1.0, 0.0]
    assert rewards[0, 1] == 0.5 and torch.isnan(rewards[1, 1])
    assert seen == dict(prompts=PROMPTS, ids=[[3], [4]], state="STATE", answer=["2", "4"])


def test_async_functions_are_awaited_concurrently():
    """`first` can only finish once `second` has started: run one after the other, it would time out."""
    started = {}

    async def first(completions, **kwargs):
        started.setdefault("event", asyncio.Event())
        await asyncio.wait_for(started["event"].wait(), timeout=20)
        return [1.0] * len(completions)

    async def second(completions, **kwargs):
        await asyncio.sleep(0)
        started.setdefault("event", asyncio.Event()).set()
        return [2.0] * len(completions)

    scorer = RewardScorer([first, exact, second])
    rewards = scorer.score(ROWS, PROMPTS, COMPLETIONS, [[3], [4]], trainer_state=None)
    assert rewards.tolist() == [[1.0, 1.0, 2.0], [1.0, 0.0, 2.0]]
    assert scorer.names == ["first", "exact", "second"]


def test_log_metric_and_log_extra():
    def logging_reward(completions, log_metric, log_extra, **kwargs):
        log_metric("my/length", float(sum(len(c) for c in completions)))
        log_extra("judge", ["ok", "bad"])
        return [0.0, 1.0]

    scorer = RewardScorer(logging_reward)
    scorer.score(ROWS, PROMPTS, COMPLETIONS, [[3], [4]], trainer_state=None)
    scorer.score(ROWS, PROMPTS, [" 22", " 5"], [[3], [4]], trainer_state=None)
    metrics, extra = scorer.pop_logged()
    assert metrics == {"my/length": pytest.approx((4 + 5) / 2)}
    assert extra == {"judge": ["ok", "bad", "ok", "bad"]}
    assert scorer.pop_logged() == ({}, {})


def test_wrong_reward_count_names_the_function():
    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="reward function 'short' returned 1 rewards; expected one per completion"):
        RewardScorer(short).score(ROWS, PROMPTS, COMPLETIONS, [[3], [4]], trainer_state=None)


@pytest.mark.parametrize("column", ["completion_ids", "trainer_state", "log_metric"])
def test_reserved_dataset_columns_are_refused(column):
    with pytest.raises(ValueError, match=rf"column\(s\) \['{column}'\] collide"):
        check_dataset_columns(["prompt", "answer", column])
    check_dataset_columns(["prompt", "answer"])


def _tiny_reward_model(tokenizer, seed=0):
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("conversational", [False, True])
def test_reward_model_scores_prompt_plus_completion(conversational, tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = _tiny_reward_model(tokenizer)
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    else:
        prompts, completions = PROMPTS, COMPLETIONS
        texts = [p + c for p, c in zip(prompts, completions)]
    expected = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding involved
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            expected.append(float(model(**ids).logits[0, 0]))
    scorer = RewardScorer([model], reward_processing_classes=[tokenizer])
    rewards = scorer.score(ROWS, prompts, completions, [[3], [4]], trainer_state=None)
    torch.testing.assert_close(rewards[:, 0], torch.tensor(expected), rtol=1e-5, atol=1e-5)

    # a model id (here a local folder) is loaded as AutoModelForSequenceClassification, tokenizer included
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    by_path = RewardScorer(str(tmp_path / "rm"))
    assert by_path.names == ["rm"]
    torch.testing.assert_close(by_path.score(ROWS, prompts, completions, [[3], [4]], trainer_state=None)[:, 0],
                               torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_processing_class_count_must_match():
    with pytest.raises(ValueError, match="reward_processing_classes has 2 entries but there are 1"):
        RewardScorer([exact], reward_processing_classes=[None, None])
