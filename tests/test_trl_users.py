"""What a TRL GRPOTrainer user brings works unchanged: TRL's reward functions, their own functions with
TRL's signature (sync and async), reward models, and TRL's conversational dataset format. Each test
asserts the reward values that reached the advantage stage (``RolloutBatch.rollouts.rewards``, the
tensor the estimator reads) against a direct, independent computation."""
from __future__ import annotations

import json

import pytest
import torch

from rltk.data.loaders import DataError
from rltk.schema import ConfigError
from rltk.trainer.rl import RLTrainer
from rltk.validate import build_recipe
from tests.conftest import small_recipe_data
from tests.factories import ScriptedEngine

G = 4
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
PROBLEMS = [(f"What is {a}+{b}?", str(a + b)) for a, b in [(2, 3), (4, 4), (1, 7), (6, 2), (3, 3), (5, 1),
                                                              (2, 2), (7, 1), (3, 4), (1, 1), (6, 3), (2, 6)]]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a chat template (characters of its charset only)."""
    import shutil

    from rltk.models import load_tokenizer

    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_model_dir, path)
    tokenizer = load_tokenizer(str(path), False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return str(path)


def write_dataset(directory, conversational: bool):
    """TRL's dataset formats as JSON Lines: ``prompt`` (text, or system + user messages), ``solution``,
    and an extra column ``level`` that only reward functions read."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", PROBLEMS[:8]), ("test", PROBLEMS[8:])):
        with open(directory / f"{split}.jsonl", "w") as handle:
            for question, answer in rows:
                prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}] \
                    if conversational else question
                handle.write(json.dumps({"prompt": prompt, "solution": answer, "level": len(question)}) + "\n")
    return str(directory)


def trl_recipe(tmp_path, model_dir, rewards, conversational=True, **sections):
    data = {"source": write_dataset(tmp_path / "data", conversational), "prompt_field": "prompt",
            "answer_field": "solution", "num_test": 4, "num_train": None}
    return build_recipe(small_recipe_data(model_dir, tmp_path / "run", data=data, rewards=rewards, **sections))


def scripted_batch(recipe, script):
    """One rollout batch whose completions ``script(answer)`` makes for every prompt (G texts each),
    and the gold answer of every completion."""
    trainer = RLTrainer(recipe)
    answers = dict(zip(trainer.train_prompts, (e.answer for e in trainer.train_examples)))
    trainer.collector.engine = ScriptedEngine(
        trainer.tokenizer, lambda prompts: [t for p in prompts for t in script(answers[p])], decoded=False)
    try:
        batch = trainer.collect()
        return batch, [answers[p] for p in batch.prompts]
    finally:
        trainer.close()


def assistant(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_trl_accuracy_reward_on_a_conversational_dataset(tmp_path, chat_model_dir):
    from trl.rewards import accuracy_reward

    recipe = trl_recipe(tmp_path, chat_model_dir, [{"name": "trl.rewards:accuracy_reward"}])
    batch, solutions = scripted_batch(recipe, lambda a: [f"\\boxed{{{a}}}", "\\boxed{0}", "no idea",
                                                         f"so it is \\boxed{{{a}}}"])
    got = batch.rollouts.rewards.tolist()
    assert got == [1.0, 0.0, 0.0, 1.0] * (len(got) // G)
    assert got == accuracy_reward(assistant(batch.texts), solutions)
    assert batch.metrics["reward/trl.rewards:accuracy_reward/mean"] == pytest.approx(0.5)


def test_trl_think_format_reward_on_a_conversational_dataset(tmp_path, chat_model_dir):
    from trl.rewards import think_format_reward

    texts = ["<think>add</think>5", "5", "<think>add", "<think>a</think><think>b</think>"]
    recipe = trl_recipe(tmp_path, chat_model_dir, [{"name": "trl.rewards:think_format_reward", "weight": 2.0}])
    batch, _ = scripted_batch(recipe, lambda a: texts)
    assert batch.rollouts.rewards.tolist() == [2.0 * v for v in think_format_reward(assistant(batch.texts))]
    assert batch.rollouts.rewards.tolist()[:G] == [2.0, 0.0, 0.0, 0.0]


CALLS: list[dict] = []


def ids_reward(prompts, completions, completion_ids, **kwargs):
    """A user function with TRL's signature: the number of completion tokens, + level/100."""
    CALLS.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return [len(ids) + row_level / 100 for ids, row_level in zip(completion_ids, kwargs["level"])]


async def async_reward(completions, scale: float = 1.0, **kwargs):
    import asyncio

    await asyncio.sleep(0)
    return [scale * len(c) for c in completions]


def test_user_function_gets_trls_arguments(tmp_path, tiny_model_dir):
    CALLS.clear()
    recipe = trl_recipe(tmp_path, tiny_model_dir, [{"name": "tests.test_trl_users:ids_reward"}], conversational=False)
    batch, _ = scripted_batch(recipe, lambda a: [a, a + a, "", None])
    call = CALLS[-1]
    n = batch.rollouts.num_completions
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch.tokens.completion_ids, batch.tokens.completion_mask)]
    assert call["completion_ids"] == ids
    assert call["completions"] == batch.texts and call["prompts"] == batch.prompts and len(call["prompts"]) == n
    assert call["trainer_state"].global_step == 0 and call["trainer_state"].max_steps == recipe.trainer.steps
    assert {"answer", "question", "solution", "level"} <= set(call)
    assert call["solution"] == call["answer"]  # this dataset's answer column is its solution
    expected = [len(i) + level / 100 for i, level in zip(ids, call["level"])]
    assert batch.rollouts.rewards.tolist() == pytest.approx(expected)
    assert batch.metrics["reward/tests.test_trl_users:ids_reward/mean"] == pytest.approx(sum(expected) / n)


def test_async_reward_with_recipe_kwargs(tmp_path, tiny_model_dir):
    recipe = trl_recipe(tmp_path, tiny_model_dir, [{"name": "tests.test_trl_users:async_reward", "kwargs": {"scale": 0.5}}],
                        conversational=False)
    batch, _ = scripted_batch(recipe, lambda a: ["1", "22", "333", "4444"])
    assert batch.rollouts.rewards.tolist()[:G] == [0.5, 1.0, 1.5, 2.0]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir):
    """A random tiny Qwen2 sequence classifier (one label) with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from rltk.models import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir, False)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("rm") / "reward-model"
    Qwen2ForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_reward_model_scores_reach_the_advantage_stage(tmp_path, tiny_model_dir, reward_model_dir):
    """Batched, right-padded scoring in the trainer equals scoring each pair alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = trl_recipe(tmp_path, tiny_model_dir, [{"model": reward_model_dir, "batch_size": 3}], conversational=False)
    batch, _ = scripted_batch(recipe, lambda a: [a, "12", "", "7+" + a])
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    with torch.no_grad():
        alone = [float(model(**tokenizer(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
                 for p, c in zip(batch.prompts, batch.texts)]
    assert batch.rollouts.rewards.tolist() == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 6) for v in alone)) > 1  # the scores differ: the test can tell pairs apart


def test_conversational_dataset_trains_and_evaluates(tmp_path, chat_model_dir):
    from rltk.workflows import train

    recipe = trl_recipe(tmp_path, chat_model_dir, [{"name": "math"}, {"name": "trl.rewards:think_format_reward"}],
                        logging={"progress": False, "log_completions_every": 1, "log_completions_rows": 3})
    result = train(recipe)
    assert result["after"]["summary"]["num_problems"] == 4
    lines = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 1, 1, 2, 2, 2]
    assert lines[0]["prompt"].startswith("system: Be brief.\nuser: What is ")
    assert set(lines[0]["rewards"]) == {"math", "trl.rewards:think_format_reward"}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward/trl.rewards:think_format_reward/mean" in m for m in metrics)


# ---------------------------------------------------------------- bad input: one line, before the model


def no_kwargs_reward(completions):
    return [0.0] * len(completions)


def needs_difficulty_reward(completions, difficulty, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize("rewards, message", [
    ([{"name": "tests.test_trl_users:no_kwargs_reward"}], "it takes no **kwargs; add **kwargs"),
    ([{"name": "math", "kwargs": {"answer": 1}}], "kwargs key 'answer' is an argument rltk passes itself"),
    ([{"model": "./no/such/reward-model"}], "reward model directory './no/such/reward-model' does not exist"),
    ([{"name": "math", "model": "x"}], "give exactly one of name"),
    ([{"name": "math"}, {"name": "math"}], "each reward may appear once"),
])
def test_bad_rewards_fail_at_load(tmp_path, tiny_model_dir, rewards, message):
    with pytest.raises(ConfigError) as info:
        build_recipe(small_recipe_data(tiny_model_dir, tmp_path / "run", rewards=rewards))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_reward_needing_a_missing_column_fails_before_the_first_rollout(tmp_path, tiny_model_dir):
    recipe = trl_recipe(tmp_path, tiny_model_dir, [{"name": "tests.test_trl_users:needs_difficulty_reward"}],
                        conversational=False)
    with pytest.raises(ConfigError, match=r"needs the dataset column difficulty, which the rows do not have \(they "
                                          r"have answer, level, question, solution\)"):
        RLTrainer(recipe)


def test_a_conversational_row_with_a_bad_role_is_one_line(tmp_path, chat_model_dir):
    path = tmp_path / "bad"
    path.mkdir()
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "solution": "2"},
            {"prompt": [{"role": "wizard", "content": "1+2?"}], "solution": "3"}]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from rltk.data.loaders import load_examples

    with pytest.raises(DataError, match=r"row 1: prompt message 0 has role 'wizard'; .* role one of system, user, "
                                        r"assistant, tool"):
        load_examples(str(path), prompt_field="prompt", answer_field="solution")


def test_chat_template_kwargs_reach_the_template(tmp_path, chat_model_dir):
    from rltk.data.loaders import load_examples
    from rltk.data.recipe import build_prompts
    from rltk.models import load_tokenizer
    from rltk.schema import DataConfig

    tokenizer = load_tokenizer(chat_model_dir, False)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("assistant: ", "{% if think %}T{% endif %}assistant: ")
    examples = load_examples(write_dataset(tmp_path / "data", True), prompt_field="prompt", answer_field="solution")

    plain = build_prompts(examples[:1], DataConfig(prompt_field="prompt"), tokenizer)[0]
    thinking = build_prompts(examples[:1], DataConfig(prompt_field="prompt", chat_template_kwargs={"think": True}),
                             tokenizer)[0]
    assert plain == "system: Be brief.\nuser: What is 2+3?\nassistant: "
    assert thinking == "system: Be brief.\nuser: What is 2+3?\nTassistant: "
