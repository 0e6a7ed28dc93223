"""Verifiable tasks and rule rewards: exact checking, held-out splits, worked solutions, adversarial completions."""

import itertools
import json
import math
import time

import pytest

from nanoseek import tasks as T
from nanoseek.tasks import (
    AdditionTask,
    CountdownTask,
    JsonlTask,
    MultiplicationTask,
    Problem,
    RewardError,
    accuracy_reward,
    combined_reward,
    first_bad_step,
    format_reward,
    make_task,
    pass_at_k,
    score_completions,
    sft_example,
    split_of,
    think_steps,
    to_messages,
    wilson_interval,
)

GENERATED = ["addition", "multiplication", "countdown"]


def wrap(answer, think="reasoning"):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def countdown(numbers, target):
    return Problem("countdown", "p", "", numbers=tuple(numbers), target=target)


ADD = Problem("addition", "What is 48 + 17?", "65", numbers=(48, 17), target=65)


# ---------------------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("name", GENERATED)
def test_train_and_eval_never_overlap(name):
    for difficulty in (1, 2, 3):
        train = {p.key for seed in range(5) for p in make_task(name, "train", difficulty).sample(seed, 200)}
        held = {p.key for seed in range(5) for p in make_task(name, "eval", difficulty).sample(seed, 100)}
        assert train and held and not train & held
        # the reason: each problem's side is a pure function of its key
        assert all(split_of(k) == "train" for k in train) and all(split_of(k) == "eval" for k in held)


def test_split_partitions_the_whole_problem_space():
    # Addition with one digit has 55 unordered problems; the split is a partition of them, both orders of the
    # operands land on the same side, and sampling only ever returns problems of its side.
    space = {Problem("addition", "", "", numbers=(a, b), target=a + b).key for a in range(10) for b in range(10)}
    assert len(space) == 55
    held = {k for k in space if split_of(k) == "eval"}
    assert 0 < len(held) < 55
    assert Problem("addition", "", "", numbers=(3, 5)).key == Problem("addition", "", "", numbers=(5, 3)).key
    assert {p.key for p in AdditionTask("eval", 1).sample(0, 300)} == held  # covers every held-out problem
    assert not {p.key for p in AdditionTask("train", 1).sample(0, 300)} & held


def test_sampling_is_deterministic_and_validates_arguments():
    assert CountdownTask("train", 2).sample(7, 20) == CountdownTask("train", 2).sample(7, 20)
    assert CountdownTask("train", 2).sample(7, 20) != CountdownTask("train", 2).sample(8, 20)
    with pytest.raises(ValueError, match="split"):
        AdditionTask("test")
    with pytest.raises(ValueError, match="difficulty"):
        AdditionTask("train", 0)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("subtraction")


# ---------------------------------------------------------------------------------------------------------------
# Worked solutions: full reward, every step valid


@pytest.mark.parametrize("name", GENERATED)
def test_solutions_get_full_reward_at_every_difficulty(name):
    for difficulty in (1, 2, 3, 4):
        for split in ("train", "eval"):
            task = make_task(name, split, difficulty)
            for p in task.sample(difficulty, 150):
                sol = task.solution(p)
                assert task.check(p, p.answer), p
                assert combined_reward(p, sol) == (1.2, {"accuracy": 1.0, "format": 1.0}), (p, sol)
                steps = think_steps(sol)
                assert sum("=" in s for s in steps) >= 1 and first_bad_step(p, steps) is None, (p, sol)


def test_problem_shapes_follow_difficulty():
    for p in AdditionTask("train", 3).sample(0, 50):
        assert [len(str(n)) for n in p.numbers] == [3, 3] and p.target == sum(p.numbers)
    for p in MultiplicationTask("train", 2).sample(0, 50):
        assert max(len(str(n)) for n in p.numbers) == 2 and p.target == p.numbers[0] * p.numbers[1]
    for d in (1, 2, 3):
        for p in CountdownTask("train", d).sample(0, 50):
            assert len(p.numbers) == d + 2 and 1 <= p.target <= 999 and p.target not in p.numbers
            assert T.evaluate_expression(p.answer)[0] == p.target  # the constructing expression reaches it


def _left_fold_values(numbers):
    """Every value a left fold ((n0 op n1) op n2) ... reaches, by brute force over the generator's operations."""
    values = {numbers[0]}
    for n in numbers[1:]:
        values = {r for a in values for r in (a + n, a - n, n - a, a * n, a / n, n / a)
                  if r > 0 and r == int(r) and (r != a * n or r <= 999)}
    return values


def test_countdown_worked_solution_is_canonical_and_valid():
    for d in (1, 2, 3):
        for split in ("train", "eval"):
            for p in CountdownTask(split, d).sample(d, 300):
                sol = CountdownTask.solution(p)
                lines = think_steps(sol)
                # the first line restates the numbers in the given order and the target, as in the prompt
                assert lines[0] == f"Numbers [{', '.join(map(str, p.numbers))}], target {p.target}.", sol
                assert f"the numbers [{', '.join(map(str, p.numbers))}]" in p.prompt
                steps = lines[1:]
                assert tuple(steps) == p.steps and len(steps) == d + 1, sol  # every number used, one per step
                assert first_bad_step(p, steps) is None and steps[-1].endswith(f"= {p.target}"), sol
                value, used = T.evaluate_expression(p.answer)
                assert value == p.target and sorted(used) == sorted(p.numbers) and CountdownTask.check(p, p, p.answer)
                assert T.extract_answer(sol) == p.answer
                # where the numbers in prompt order fold left to the target, the solution is that fold
                if p.target in _left_fold_values(p.numbers):
                    acc = p.numbers[0]
                    for k, step in enumerate(steps):
                        a, _, b, _, c = step.split()
                        assert {int(a), int(b)} == {acc, p.numbers[k + 1]}, (p.numbers, p.target, steps)
                        acc = int(c)


def test_canonical_countdown_search_order():
    assert T.canonical_countdown([3, 5, 7], 22) == (("3 * 5 = 15", "15 + 7 = 22"), "3 * 5 + 7")
    assert T.canonical_countdown([5, 3, 7], 14) == (("5 - 3 = 2", "2 * 7 = 14"), "(5 - 3) * 7")
    assert T.canonical_countdown([3, 12, 7], 11) == (("12 / 3 = 4", "4 + 7 = 11"), "12 / 3 + 7")  # b / a
    # no left fold of 20, 2, 3 reaches 26, nor any start from (20, 3): the pair (2, 3) comes next
    assert T.canonical_countdown([20, 2, 3], 26) == (("2 * 3 = 6", "20 + 6 = 26"), "20 + 2 * 3")
    assert T.canonical_countdown([2, 3, 5], 999) is None


def test_worked_solution_formats():
    add = AdditionTask.solution(Problem("addition", "", "1020", numbers=(955, 65), target=1020))
    assert "5 + 5 + 0 = 10, write 0 carry 1" in add and "9 + 0 + 1 = 10, write 0 carry 1" in add
    assert add.endswith("955 + 65 = 1020\n</think>\n<answer>1020</answer>")
    mul = MultiplicationTask.solution(Problem("multiplication", "", "9022", numbers=(347, 26), target=9022))
    assert "347 * 6 = 2082\n347 * 20 = 6940\n2082 + 6940 = 9022\n347 * 26 = 9022" in mul


# ---------------------------------------------------------------------------------------------------------------
# Step checker


def test_step_checker_finds_first_bad_step_in_arithmetic():
    steps = think_steps(AdditionTask.solution(Problem("addition", "", "1020", numbers=(955, 65), target=1020)))
    # steps: [text, "5 + 5 + 0 = 10, write 0 carry 1", "5 + 6 + 1 = 12, ...", "9 + 0 + 1 = 10, ...", final]
    assert first_bad_step(ADD, steps) is None
    wrong_sum = steps[:2] + ["5 + 6 + 1 = 13, write 3 carry 1"] + steps[3:]
    assert first_bad_step(ADD, wrong_sum) == 2
    wrong_carry = steps[:3] + ["9 + 0 + 1 = 10, write 0 carry 0"] + steps[4:]
    assert first_bad_step(ADD, wrong_carry) == 3
    assert first_bad_step(ADD, steps[:1] + ["5 + x = 10"]) == 1  # malformed step
    mul = Problem("multiplication", "", "9022", numbers=(347, 26), target=9022)
    assert first_bad_step(mul, ["347 * 6 = 2082", "347 * 20 = 6840", "2082 + 6840 = 8922"]) == 1


def test_step_checker_countdown_tracks_available_numbers():
    p = countdown([3, 5, 7], 22)
    assert first_bad_step(p, ["3 * 5 = 15", "15 + 7 = 22"]) is None
    assert first_bad_step(p, ["try small products first", "3 * 5 = 15", "15 + 7 = 23"]) == 2  # wrong arithmetic
    assert first_bad_step(p, ["3 * 5 = 15", "15 + 3 = 18"]) == 1  # 3 already used
    assert first_bad_step(p, ["3 * 5 = 15", "15 + 15 = 30"]) == 1  # 15 available once
    assert first_bad_step(p, ["3 * 8 = 24"]) == 0  # 8 was never given
    assert first_bad_step(p, ["7 - 5 = 2", "2 * 3 = 6", "6 + 7 = 13"]) == 2  # 7 consumed by the first step
    # partial generation (unclosed think) during search
    assert think_steps("<think>\n3 * 5 = 15\n15 + 8") == ["3 * 5 = 15", "15 + 8"]
    assert first_bad_step(p, think_steps("<think>\n3 * 5 = 15\n15 + 8 = 23")) == 1
    with pytest.raises(ValueError, match="no step checker"):
        first_bad_step(Problem("jsonl", "q", "a"), ["1 = 1"])


# ---------------------------------------------------------------------------------------------------------------
# Rewards: good, malformed, adversarial


def test_accuracy_reward_reads_the_last_answer_tag_only():
    assert accuracy_reward(ADD, wrap("65")) == 1.0
    assert accuracy_reward(ADD, wrap(" 65 ")) == 1.0
    assert accuracy_reward(ADD, wrap("64")) == 0.0
    assert accuracy_reward(ADD, "<think>48 + 17 = 65</think> The answer is 65.") == 0.0  # outside tags
    assert accuracy_reward(ADD, "65") == 0.0
    assert accuracy_reward(ADD, "<answer>64</answer><answer>65</answer>") == 1.0  # last one counts
    assert accuracy_reward(ADD, "<answer>65</answer><answer>64</answer>") == 0.0
    assert accuracy_reward(ADD, "<answer>65</answer><answer>64") == 1.0  # unclosed trailing tag is not an answer
    assert accuracy_reward(ADD, "<answer><answer>65</answer>") == 1.0  # innermost of the last block


def test_format_reward():
    assert format_reward("<think>\nstep\n</think>\n<answer>65</answer>") == 1.0
    assert format_reward("  <think>a</think><answer>b</answer>\n\n") == 1.0
    bad = [
        "",
        "<answer>65</answer>",  # no thinking
        "<think>a</think>",  # no answer
        "<answer>65</answer><think>a</think>",  # answer before thinking
        "<think>a</think><answer>65</answer> and more",  # text after the answer
        "hello <think>a</think><answer>65</answer>",  # text before thinking
        "<think>a</think>between<answer>65</answer>",  # text between
        "<think>a</think><answer>1</answer><answer>2</answer>",  # several answers
        "<think>a<think>b</think><answer>1</answer>",  # nested tag
        "<think>a</think><answer><answer>1</answer>",
        "<think>  </think><answer>1</answer>",  # blank thinking
        "<think>a</think><answer> </answer>",  # blank answer
        "<think>a</think><answer>1</answer",  # unclosed
        "<THINK>a</THINK><ANSWER>1</ANSWER>",
    ]
    for completion in bad:
        assert format_reward(completion) == 0.0, completion


def test_combined_reward_weights_and_components():
    total, parts = combined_reward(ADD, wrap("65"))
    assert parts == {"accuracy": 1.0, "format": 1.0} and total == pytest.approx(1.2)
    total, parts = combined_reward(ADD, "<answer>65</answer>", weights={"accuracy": 2.0})
    assert parts == {"accuracy": 1.0, "format": 0.0} and total == 2.0
    assert combined_reward(ADD, wrap("64"), weights={"accuracy": 1.0, "format": 0.5})[0] == 0.5
    with pytest.raises(ValueError, match="unknown reward weights"):
        combined_reward(ADD, wrap("65"), weights={"length": 1.0})


def test_arithmetic_checker_adversarial_answers():
    for text in ["", " ", "65.0", "6 5", "+65", "0x41", "65e0", "６５", "٦٥", "sixty-five", "64 + 1", "-65"]:
        assert not T.check(ADD, text), text
    assert T.check(Problem("addition", "", "-3", numbers=(0, 0), target=-3), "-3")
    t0 = time.perf_counter()
    assert not T.check(ADD, "9" * 1_000_000)  # no int() on a million digits (would also raise past 4300)
    assert accuracy_reward(ADD, wrap("9" * 1_000_000)) == 0.0
    assert time.perf_counter() - t0 < 0.5


def test_countdown_checker():
    p = countdown([3, 5, 7], 22)
    assert T.check(p, "3 * 5 + 7") and T.check(p, "(7 + 3) * 5 - 28 * 1") is False
    assert T.check(p, " 7 + 3*5 ")
    assert T.check(countdown([2, 4, 6], 3), "6 / 4 * 2")  # exact rationals: 6/4 = 3/2, not 1
    assert T.check(countdown([4, 6, 10], 1), "10 - 6 - 4 + 1") is False  # 1 was not given
    assert T.check(countdown([4, 6, 1], 1), "1")  # a subset is fine (each number at most once)
    rejected = [
        "3 * 5 + 7 + 0",  # 0 not given
        "3 * 5 + 7 * 1",  # 1 not given
        "5 * 5 - 3",  # reuse
        "(3 + 3) * 5 - 7 - 1",
        "3 * 5 + 8 - 1",
        "7 / (5 - 5) + 3",  # division by zero (and reuse)
        "7 / (3 - 3)",
        "2**10**10",  # ** is not an operator here, and never evaluated
        "3 ** 2 + 13",
        "__import__('os').system('true')",
        "eval('22')",
        "22",  # the target itself is not a given number
        "-3 + 25",  # unary minus is not allowed
        "3.0 * 5 + 7",
        "3 * 5 + 7;",
        "3 * 5 + 7 if 1 else 0",
        "(3 * 5 + 7",
        "3 × 5 + 7",  # unicode operator
        "３ * 5 + 7",  # fullwidth digit
        "",
        "()",
        "1" * 300,  # over-long
        "9" * 20 + " - " + "9" * 20 + " + 22",  # over-long literals
    ]
    for text in rejected:
        assert not T.check(p, text), text
    assert T.check(p, "(" * 50 + "3" + ")" * 50 + " * 5 + 7")  # redundant parentheses are fine
    # Size is bounded before parsing: without it a balanced product of ~30k literals (2.7 MB) takes ~10 s of
    # big-rational arithmetic, and a chain of ~1000 products overflows the evaluator's recursion.
    with pytest.raises(T.ExpressionError, match="longer than"):
        T.evaluate_expression("1+" * 200 + "1")
    with pytest.raises(T.ExpressionError, match="only ASCII digits"):
        T.evaluate_expression("f(3)")
    with pytest.raises(T.ExpressionError, match="Pow is not allowed"):
        T.evaluate_expression("3 ** 2")
    with pytest.raises(T.ExpressionError, match="USub is not allowed"):
        T.evaluate_expression("-3 + 5")
    with pytest.raises(T.ExpressionError, match="division by zero"):
        T.evaluate_expression("1 / (2 - 2)")


def test_countdown_checker_is_fast_on_hostile_input():
    p = countdown([3, 5, 7], 22)
    hostile = [
        "9" * 100_000,
        "(" * 100_000,
        "1*" * 100_000 + "1",
        "<answer>" * 10_000,
        "9999999999 * " * 18 + "9",
        "((((((((((" * 20 + ")" * 200,
    ]
    t0 = time.perf_counter()
    for text in hostile:
        assert not T.check(p, text)
        assert accuracy_reward(p, wrap(text)) == 0.0
        assert format_reward(text) == 0.0
    assert time.perf_counter() - t0 < 1.0


def test_score_completions_surfaces_reward_errors():
    problems = [ADD, ADD]
    assert score_completions(problems, [wrap("65"), "nope"], accuracy_reward) == [1.0, 0.0]
    assert score_completions(problems, [wrap("65"), wrap("1")], combined_reward) == [pytest.approx(1.2), 0.2]

    def broken(problem, completion):
        if "boom" in completion:
            raise KeyError("boom")
        return 1.0

    long_completion = "boom " + "x" * 5000
    with pytest.raises(RewardError, match="boom") as info:
        score_completions(problems, [wrap("65"), long_completion], broken)
    message = str(info.value)
    assert "completion 1" in message and "broken" in message and "(5005 chars)" in message
    assert len(message) < 600 and isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardError, match="nan"):
        score_completions([ADD], ["x"], lambda p, c: math.nan)
    with pytest.raises(ValueError, match="one problem per completion"):
        score_completions([ADD], ["a", "b"], accuracy_reward)


# ---------------------------------------------------------------------------------------------------------------
# JSONL tasks


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_task_loads_splits_and_checks(tmp_path):
    rows = [json.dumps({"prompt": f"What is the capital of country {i}?", "answer": f"City {i}"}) for i in range(200)]
    rows.append(json.dumps({"prompt": "Half of 7?", "answer": 3.5, "reasoning": "7 / 2 = 3.5"}))
    path = write_jsonl(tmp_path / "qa.jsonl", rows + [""])
    train, held = JsonlTask(path, "train"), JsonlTask(path, "eval")
    assert len(train.problems) + len(held.problems) == 201 and held.problems
    assert not {p.prompt for p in train.problems} & {p.prompt for p in held.problems}
    assert make_task(str(path), "eval").problems == held.problems
    p = train.problems[0] if train.problems[0].prompt != "Half of 7?" else train.problems[1]
    assert train.check(p, p.answer.lower()) and train.check(p, "  " + p.answer.replace(" ", "   "))
    assert not train.check(p, "Somewhere else") and not train.check(p, p.answer * 100)
    half = Problem("jsonl", "Half of 7?", "3.5", reasoning="7 / 2 = 3.5")
    assert T.check(half, "3.50") and not T.check(half, "7/2") and not T.check(half, "3.6")
    assert accuracy_reward(half, sft_example(half)[-1]["content"]) == 1.0
    with pytest.raises(ValueError, match="reasoning"):
        T.solution(p)
    assert len(train.sample(0, 30)) == 30 and all(q in train.problems for q in train.sample(1, 30))


def test_jsonl_refuses_bad_files_naming_file_and_line(tmp_path):
    good = json.dumps({"prompt": "q", "answer": "a"})
    no_answer = write_jsonl(tmp_path / "a.jsonl", [good, json.dumps({"prompt": "q2"})])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: missing or empty \"answer\""):
        JsonlTask(no_answer)
    empty_answer = write_jsonl(tmp_path / "b.jsonl", [json.dumps({"prompt": "q", "answer": " "})])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: missing"):
        JsonlTask(empty_answer)
    broken = write_jsonl(tmp_path / "c.jsonl", [good, good, '{"prompt": "q", "answer": '])
    with pytest.raises(ValueError, match=r"c\.jsonl:3: not valid JSON"):
        JsonlTask(broken)
    not_object = write_jsonl(tmp_path / "d.jsonl", ['["q", "a"]'])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected an object"):
        JsonlTask(not_object)


# ---------------------------------------------------------------------------------------------------------------
# Messages and statistics


def test_messages_and_sft_example():
    p = CountdownTask("train", 1).sample(0, 1)[0]
    messages = to_messages(p)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == T.DEFAULT_SYSTEM and messages[1]["content"] == p.prompt
    assert to_messages(p, system_prompt="S")[0]["content"] == "S"
    sft = sft_example(p)
    assert sft[:2] == messages and sft[2]["role"] == "assistant"
    assert sft[2]["content"] == CountdownTask.solution(p)
    assert combined_reward(p, sft[2]["content"])[1] == {"accuracy": 1.0, "format": 1.0}


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in itertools.product(range(1, 9), range(0, 9), range(1, 9)):
        if c <= n and k <= n:
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Chen et al. 2021, eq. 1
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_wilson_interval():
    low, high = wilson_interval(8, 10)  # textbook value: (0.490, 0.943)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(500, 1000)
    # half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 1.96 * 0.0158417 / 1.0038416 = 0.030931
    assert high - low == pytest.approx(2 * 0.030931, abs=2e-6)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
