"""Verifiable reasoning tasks and rule-based rewards (DeepSeek-R1-Zero style).

Every problem is generated on the fly and checked exactly; the rewards are rules, never a neural reward model
(R1 paper, sec. 2.2.2: accuracy reward + format reward). Tasks:

  addition        "What is 4821 + 379?"          answer: an integer
  multiplication  "What is 347 * 26?"            answer: an integer
  countdown       reach a target with the given numbers, each at most once, + - * / and parentheses
                                                 answer: an expression, evaluated with exact rationals
  jsonl           user problems from a JSONL file of {"prompt": ..., "answer": ...} objects

Held-out split: a problem belongs to "train" or "eval" by a hash of its canonical key (`Problem.key`, e.g.
the unordered operands and the operation), the same for every seed and every run. A Task only yields problems
of its own split, so train and eval never overlap, whatever seeds are used. EVAL_FRACTION defines which
problems are held out: changing it changes the benchmark.

Completion format (R1-Zero's, DEFAULT_SYSTEM or R1_ZERO_SYSTEM):  <think> reasoning </think> <answer> answer </answer>

Step format, for the worked solutions and the step checker used by tree search: one step per line inside
<think>. A line that contains "=" is a step, `<expression> = <integer>`; other lines are free text and are never
judged. Arithmetic steps may end with ", write D carry C" (column addition), which must agree with the result.
Countdown steps may only use numbers still available: the given numbers (each once) and the results of
earlier steps (each once), as in the game.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .data import DataError, iter_jsonl

EVAL_FRACTION = 0.1  # share of each task's problem space held out for evaluation (by hash; see split_of)

# R1-Zero's training template (DeepSeek-R1 paper, Table 1), as a system prompt.
R1_ZERO_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
# The same instruction in ~20 tokens instead of ~100: the default, because on a CPU every token of a packed SFT
# row counts, and with R1_ZERO_SYSTEM an addition example is 3/4 system prompt (2.7x fewer examples per step).
DEFAULT_SYSTEM = "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>."

# Bounds applied before anything is parsed or evaluated, so an adversarial completion costs microseconds.
MAX_EXPR_CHARS = 256  # longest expression the evaluator will look at
MAX_NUMBER_DIGITS = 18  # longest integer literal inside an expression
MAX_ANSWER_DIGITS = 64  # longest integer accepted as an arithmetic answer
_EXPR_CHARS = re.compile(r"[0-9+\-*/() \t]*", re.ASCII)  # whitelist: ASCII digits, + - * /, parens, blanks
_INT = re.compile(r"-?[0-9]+", re.ASCII)  # ASCII only: int() would also accept unicode digits like "٣"
_DECIMAL = re.compile(r"-?[0-9]{1,64}(\.[0-9]{1,64})?", re.ASCII)


@dataclass(frozen=True)
class Problem:
    """One problem. `prompt` is the user message; `answer` is a canonical correct answer (for countdown, one
    expression that reaches the target; any other valid expression is also correct)."""

    task: str
    prompt: str
    answer: str
    numbers: tuple[int, ...] = ()  # operands (arithmetic) or the numbers on offer (countdown)
    target: int | None = None  # the exact value to reach (arithmetic result or countdown target)
    steps: tuple[str, ...] = ()  # countdown: the construction, one "a op b = c" per step
    reasoning: str = ""  # jsonl: optional worked reasoning supplied by the user, for SFT

    @property
    def key(self) -> str:
        """Canonical identity used for the train/eval split: equal problems (up to operand order) share it."""
        if self.task in ("addition", "multiplication"):
            return f"{self.task}:{sorted(self.numbers)}"
        if self.task == "countdown":
            return f"countdown:{sorted(self.numbers)}->{self.target}"
        return f"{self.task}:{self.prompt}"


def split_of(key: str) -> str:
    """'eval' for a fixed EVAL_FRACTION of keys, 'train' for the rest: a pure function of the key (sha256,
    not Python's salted hash), so a problem is on the same side for every seed, process and machine."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "eval" if h < EVAL_FRACTION * 2**64 else "train"


# ----------------------------------------------------------------------------------------------------------------
# Safe expression evaluation (never `eval`): ast with a whitelist of nodes, exact rational arithmetic.


class ExpressionError(ValueError):
    """The text is not an allowed arithmetic expression."""


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Value of `text` and the integer literals it uses. Allowed: non-negative integer literals, binary + - * /,
    parentheses. Not allowed (ExpressionError): unary minus/plus (countdown numbers are positive, and -(a-b) is
    b-a anyway), **, names, calls, floats, non-ASCII digits, division by zero, over-long input."""
    if not isinstance(text, str):
        raise ExpressionError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} characters")
    if not _EXPR_CHARS.fullmatch(text):
        raise ExpressionError("only ASCII digits, + - * /, parentheses and spaces are allowed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ExpressionError(f"not a valid expression ({type(e).__name__})") from None
    literals: list[int] = []
    ops = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__}

    def value(node: ast.AST) -> Fraction:
        # The node type is checked before any child is evaluated, so e.g. 2**10**10 is refused, not computed.
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if len(str(node.value)) > MAX_NUMBER_DIGITS:
                raise ExpressionError(f"number with more than {MAX_NUMBER_DIGITS} digits")
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div):
                if right == 0:
                    raise ExpressionError("division by zero")
                return left / right
            return ops[type(node.op)](left, right)
        what = type(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node).__name__
        raise ExpressionError(f"{what} is not allowed; use numbers, + - * / and parentheses")

    try:
        return value(tree.body), literals
    except RecursionError:  # a chain like 1*1*...*1 nests deeper than Python's stack
        raise ExpressionError("expression nested too deeply") from None


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if len(text) > MAX_ANSWER_DIGITS + 1 or not _INT.fullmatch(text):
        return None
    return int(text)


# ----------------------------------------------------------------------------------------------------------------
# Checkers: one pure function per task, (problem, answer_text) -> bool. Never raise on model output.


def _check_arithmetic(problem: Problem, answer_text: str) -> bool:
    return _parse_int(answer_text) == problem.target


def _check_countdown(problem: Problem, answer_text: str) -> bool:
    try:
        result, used = evaluate_expression(answer_text)
    except ExpressionError:
        return False
    # Each given number at most once: the multiset of literals must fit inside the multiset on offer.
    return not (Counter(used) - Counter(problem.numbers)) and result == problem.target


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def _check_jsonl(problem: Problem, answer_text: str) -> bool:
    """Equal after collapsing whitespace and case; numerically equal if both sides are plain numbers
    ("3.50" == "3.5", "7/2" is not a number here, write answers in the form the file uses)."""
    if len(answer_text) > 4 * len(problem.answer) + 64:
        return False
    got, want = _normalize(answer_text), _normalize(problem.answer)
    if _DECIMAL.fullmatch(got) and _DECIMAL.fullmatch(want):
        return Fraction(got) == Fraction(want)
    return got == want


_CHECKERS: dict[str, Callable[[Problem, str], bool]] = {
    "addition": _check_arithmetic,
    "multiplication": _check_arithmetic,
    "countdown": _check_countdown,
    "jsonl": _check_jsonl,
}


def check(problem: Problem, answer_text: str) -> bool:
    """Is `answer_text` (the content of the answer tag, not the whole completion) a correct answer?"""
    if problem.task not in _CHECKERS:
        raise ValueError(f"no checker for task {problem.task!r}; known tasks: {sorted(_CHECKERS)}")
    return _CHECKERS[problem.task](problem, answer_text)


# ----------------------------------------------------------------------------------------------------------------
# Step-level checking (for verifier-guided tree search): the index of the first wrong step, or None.

_STEP = re.compile(r"\s*(?P<lhs>[^=]*?)\s*=\s*(?P<rhs>-?[0-9]+)\s*(?P<rest>.*?)\s*", re.ASCII | re.DOTALL)
_CARRY = re.compile(r",?\s*write\s+(?P<digit>[0-9])\s+carry\s+(?P<carry>[0-9]+)\s*\.?", re.ASCII)


def think_steps(completion: str) -> list[str]:
    """Non-empty lines inside the first <think> block (to the end of the text if it is not closed yet, so that
    a partial generation can be checked during search)."""
    start = completion.find("<think>")
    body = completion[start + len("<think>") :] if start >= 0 else completion
    end = body.find("</think>")
    body = body if end < 0 else body[:end]
    return [line.strip() for line in body.splitlines() if line.strip()]


def _parse_step(line: str) -> tuple[Fraction, list[int], int, str] | None:
    if len(line) > 2 * MAX_EXPR_CHARS:
        return None
    m = _STEP.fullmatch(line)
    if not m or len(m["rhs"]) > MAX_ANSWER_DIGITS:
        return None
    try:
        value, used = evaluate_expression(m["lhs"])
    except ExpressionError:
        return None
    return value, used, int(m["rhs"]), m["rest"]


STEP_TASKS = ("addition", "multiplication", "countdown")  # the tasks whose steps first_bad_step can check


def first_bad_step(problem: Problem, steps: list[str]) -> int | None:
    """Index (into `steps`, see think_steps) of the first step that is wrong, or None if all are right.

    arithmetic: every "expr = n" line must be true, and a trailing ", write D carry C" must match n.
    countdown: every "expr = n" line must be true and use only numbers still available (given numbers and
    earlier results, each once); the step's result becomes available.
    """
    return _walk_steps(problem, steps)[0]


def step_state(problem: Problem, steps: list[str]) -> tuple:
    """What the valid steps at the start of `steps` (those before first_bad_step) reach, as a hashable state: for
    countdown the multiset of numbers still available, so two orders of the same combinations are one state; for
    arithmetic the equations in order, whitespace normalised. Free-text lines reach nothing. RMaxTS rewards new
    states, as Prover's tree rewards new tactic states, so rewording a line earns no intrinsic reward."""
    return _walk_steps(problem, steps)[1]


def _walk_steps(problem: Problem, steps: list[str]) -> tuple[int | None, tuple]:
    """(first_bad_step, step_state): one walk over the steps, checking each and tracking what it reaches."""
    if problem.task not in STEP_TASKS:
        raise ValueError(f"no step checker for task {problem.task!r} (steps are checked for arithmetic and countdown)")
    countdown = problem.task == "countdown"
    pool, equations = Counter(problem.numbers), []

    def state() -> tuple:
        return tuple(sorted(pool.elements())) if countdown else tuple(equations)

    for i, line in enumerate(steps):
        if "=" not in line:
            continue  # free text
        parsed = _parse_step(line)
        if parsed is None:
            return i, state()
        value, used, result, rest = parsed
        if value != result:
            return i, state()
        if countdown:
            if rest.strip(" .") or Counter(used) - pool:
                return i, state()
            pool = pool - Counter(used) + Counter([result])
        else:
            if rest.strip(" ."):
                m = _CARRY.fullmatch(rest)
                if not m or int(m["digit"]) != result % 10 or int(m["carry"]) != result // 10:
                    return i, state()
            equations.append(" ".join(line.split()))
    return None, state()


# ----------------------------------------------------------------------------------------------------------------
# Tasks


def _rng(rng_or_seed: random.Random | int) -> random.Random:
    return rng_or_seed if isinstance(rng_or_seed, random.Random) else random.Random(rng_or_seed)


class Task:
    """A source of problems of one split. Subclasses implement `_generate(rng)` (one candidate, any split) and
    `solution`; `sample` keeps only candidates whose hash puts them in this task's split."""

    name = ""

    def __init__(self, split: str = "train", difficulty: int = 1):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not isinstance(difficulty, int) or difficulty < 1:
            raise ValueError(f"difficulty must be an integer >= 1, got {difficulty!r}")
        self.split, self.difficulty = split, difficulty

    def _generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def sample(self, rng_or_seed: random.Random | int, n: int) -> list[Problem]:
        """n problems of this split (with replacement), deterministic given the seed."""
        rng, out = _rng(rng_or_seed), []
        max_tries = 1000 * max(n, 1)
        for _ in range(max_tries):
            if len(out) == n:
                break
            problem = self._generate(rng)
            if split_of(problem.key) == self.split:
                out.append(problem)
        if len(out) < n:
            raise RuntimeError(
                f"{self.name} (difficulty {self.difficulty}) found only {len(out)} {self.split} problems in "
                f"{max_tries} tries; its problem space is too small for this split, raise the difficulty"
            )
        return out

    def check(self, problem: Problem, answer_text: str) -> bool:
        return check(problem, answer_text)

    @staticmethod
    def solution(problem: Problem) -> str:
        """A worked solution `<think>...</think>\\n<answer>...</answer>` for SFT warm-starts."""
        raise NotImplementedError

    def first_bad_step(self, problem: Problem, steps: list[str]) -> int | None:
        return first_bad_step(problem, steps)


def _random_int(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def format_completion(think: list[str], answer: str) -> str:
    """`<think>` the lines `</think><answer>` answer `</answer>`, the layout of every worked solution."""
    return "<think>\n" + "\n".join(think) + "\n</think>\n<answer>" + answer + "</answer>"


class AdditionTask(Task):
    """a + b, both operands with exactly `difficulty` digits (1: 0-9). One layout per difficulty, so every digit
    of the worked solution sits at a fixed distance from the digit of the question it comes from: a small model
    learns such fixed-offset lookups within a CPU speedrun, and lookups that depend on operand lengths it does
    not (dev/LOG.md)."""

    name = "addition"

    def _generate(self, rng):
        a = _random_int(rng, self.difficulty)
        b = _random_int(rng, self.difficulty)
        return Problem(self.name, f"What is {a} + {b}?", str(a + b), numbers=(a, b), target=a + b)

    @staticmethod
    def solution(problem):
        a, b = problem.numbers
        width = max(len(str(a)), len(str(b)))
        da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
        lines, carry = ["Add the digits column by column from the right, carrying the tens."], 0
        for x, y in zip(da, db):
            s = int(x) + int(y) + carry
            lines.append(f"{x} + {y} + {carry} = {s}, write {s % 10} carry {s // 10}")
            carry = s // 10
        lines.append(f"{a} + {b} = {a + b}")
        return format_completion(lines, problem.answer)


class MultiplicationTask(Task):
    """a * b; the first operand has `difficulty` digits, the second 1..difficulty digits."""

    name = "multiplication"

    def _generate(self, rng):
        a = _random_int(rng, self.difficulty)
        b = _random_int(rng, rng.randint(1, self.difficulty))
        if rng.random() < 0.5:
            a, b = b, a
        return Problem(self.name, f"What is {a} * {b}?", str(a * b), numbers=(a, b), target=a * b)

    @staticmethod
    def solution(problem):
        a, b = problem.numbers
        lines = [f"Multiply {a} by each digit of {b} at its place value, then add the partial products."]
        partials = []
        for place, digit in enumerate(reversed(str(b))):
            if digit != "0":
                factor = int(digit) * 10**place
                lines.append(f"{a} * {factor} = {a * factor}")
                partials.append(a * factor)
        total = partials[0] if partials else 0
        for p in partials[1:]:
            lines.append(f"{total} + {p} = {total + p}")
            total += p
        lines.append(f"{a} * {b} = {a * b}")
        return format_completion(lines, problem.answer)


def _join_expression(ea: str, pa: int, op: str, eb: str, pb: int) -> tuple[str, int]:
    """`ea op eb` with minimal parentheses and its precedence (3 atom, 2 for * /, 1 for + -); exact rational
    arithmetic makes a+(b-c) == a+b-c and a*(b/c) == a*b/c, so only a lower precedence, or an equal one on the
    right of - or /, needs them."""
    prec = 1 if op in "+-" else 2
    left = ea if pa >= prec else f"({ea})"
    right = eb if pb > prec or (pb == prec and op in "+*") else f"({eb})"
    return f"{left} {op} {right}", prec


def _countdown_ops(a: int, b: int, max_target: int) -> list[tuple[bool, str, int]]:
    """(swapped, op, result) for the operations on a and b that keep every value a positive integer and products
    at most max_target (the generator's rules), in the canonical order: a + b, a - b or b - a, a * b, a / b,
    b / a. swapped: the operation is b op a."""
    out = [(False, "+", a + b)]
    if a != b:
        out.append((False, "-", a - b) if a > b else (True, "-", b - a))
    if a * b <= max_target:
        out.append((False, "*", a * b))
    if b > 1 and a % b == 0:
        out.append((False, "/", a // b))
    if a > 1 and b % a == 0 and a != b:
        out.append((True, "/", b // a))
    return out


def canonical_countdown(numbers, target: int, max_target: int = 999, max_nodes: int = 100_000):
    """The canonical solution of a countdown problem as (steps, expression), or None if the search finds none
    within max_nodes pools. Every number is used. Each step combines a pair of the pool and puts the result in
    the left number's place; the sequences of pairs are tried in lexicographic order ((0, 1), (0, 1), ... first,
    which is the left fold `((n0 op n1) op n2) ...` over the numbers in the given order), and for each sequence
    the operations depth first in the order of _countdown_ops."""
    budget = [max_nodes]

    def search(pool, pairs):  # pool: list of (value, expression, precedence)
        if not pairs:
            return [] if pool[0][0] == target else None
        budget[0] -= 1
        if budget[0] < 0:
            return None
        i, j = pairs[0]
        for swapped, op, c in _countdown_ops(pool[i][0], pool[j][0], max_target):
            (a, ea, pa), (b, eb, pb) = (pool[j], pool[i]) if swapped else (pool[i], pool[j])
            expression, prec = _join_expression(ea, pa, op, eb, pb)
            found = search(pool[:i] + [(c, expression, prec)] + pool[i + 1 : j] + pool[j + 1 :], pairs[1:])
            if found is not None:
                return [(f"{a} {op} {b} = {c}", expression)] + found
        return None

    start = [(v, str(v), 3) for v in numbers]
    for pairs in itertools.product(*[list(itertools.combinations(range(m), 2)) for m in range(len(numbers), 1, -1)]):
        found = search(start, pairs)
        if found is not None:
            return tuple(step for step, _ in found), found[-1][1]
        if budget[0] < 0:
            return None
    return None


class CountdownTask(Task):
    """Countdown (as in TinyZero): `difficulty + 2` numbers from 1..max_value (20, 40, 80, then 100), a target
    in 1..999 built by combining all of them with random operations whose intermediate results are positive
    integers (so every instance is solvable). Any expression using each number at most once is accepted.

    The worked solution is canonical, not the random construction: its first line restates the numbers in the
    order given and the target, and its steps are the first solution (using every number) found by a
    depth-first search that combines the leftmost pair first and puts the result in the left number's place,
    so where one exists it is the left fold `((n0 op n1) op n2) ...` over the numbers in prompt order. A small
    model copies numbers it can find by their order; from an arbitrary pair it did not learn to (dev/LOG.md)."""

    name = "countdown"
    max_target = 999

    def _generate(self, rng):
        count, max_value = self.difficulty + 2, min(100, 10 * 2**self.difficulty)
        while True:
            numbers = [rng.randint(1, max_value) for _ in range(count)]
            # pool items: (value, expression, precedence): 3 atom, 2 for * /, 1 for + -
            pool, steps = [(v, str(v), 3) for v in numbers], []
            while len(pool) > 1:
                i, j = rng.sample(range(len(pool)), 2)
                (a, ea, pa), (b, eb, pb) = pool[i], pool[j]
                ops = ["+"]  # only operations that keep every intermediate a positive integer
                if a > b:
                    ops.append("-")
                if a * b <= self.max_target:
                    ops.append("*")
                if b > 1 and a % b == 0:
                    ops.append("/")
                op = rng.choice(ops)
                c = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
                steps.append(f"{a} {op} {b} = {c}")
                pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(c, *_join_expression(ea, pa, op, eb, pb))]
            target, expression = pool[0][0], pool[0][1]
            if 1 <= target <= self.max_target and target not in numbers:
                break
        found = canonical_countdown(numbers, target, self.max_target)
        if found is not None:  # always, up to the search's node budget (then the construction is kept)
            steps, expression = found
        prompt = (
            f"Using the numbers {numbers}, create an expression that equals {target}. You may use + - * / and "
            f"parentheses, and each number at most once. Give only the expression as the answer."
        )
        return Problem(self.name, prompt, expression, numbers=tuple(numbers), target=target, steps=tuple(steps))

    @staticmethod
    def solution(problem):
        numbers = ", ".join(map(str, problem.numbers))
        lines = [f"Numbers [{numbers}], target {problem.target}."] + list(problem.steps)
        return format_completion(lines, problem.answer)


class JsonlTask(Task):
    """User problems from a JSONL file, one {"prompt": str, "answer": str|number} object per line (an optional
    "reasoning" string is used as the worked solution for SFT). Every line must have an answer: a task without
    answers cannot be checked. The split is by hash of the prompt, as for the generated tasks."""

    name = "jsonl"

    def __init__(self, path: str | Path, split: str = "train"):
        super().__init__(split=split, difficulty=1)
        self.path = Path(path)
        self.problems: list[Problem] = []
        for lineno, row in iter_jsonl(self.path, example='{"prompt": "...", "answer": "..."}'):
            where = f"{self.path}:{lineno}"
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise DataError(f'{where}: expected a non-empty string "prompt"')
            answer = row.get("answer")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
                raise DataError(f'{where}: missing or empty "answer"; rewards are checked against it, so every '
                                f"problem needs one (string or number)")
            reasoning = row.get("reasoning", "")
            if not isinstance(reasoning, str):
                raise DataError(f'{where}: "reasoning" must be a string')
            problem = Problem(self.name, row["prompt"], str(answer).strip(), reasoning=reasoning)
            if split_of(problem.key) == split:
                self.problems.append(problem)
        if not self.problems:
            raise DataError(f"{self.path}: no {split} problems (the split is by hash; add more lines)")

    def sample(self, rng_or_seed, n):
        rng = _rng(rng_or_seed)
        return [rng.choice(self.problems) for _ in range(n)]

    @staticmethod
    def solution(problem):
        if not problem.reasoning.strip():
            raise ValueError(
                f'JSONL problem {problem.prompt[:60]!r} has no "reasoning"; add one to its line to use it for SFT'
            )
        return format_completion([problem.reasoning.strip()], problem.answer)


TASKS: dict[str, type[Task]] = {
    "addition": AdditionTask,
    "multiplication": MultiplicationTask,
    "countdown": CountdownTask,
}


def solution(problem: Problem) -> str:
    """The worked solution of any problem (see Task.solution)."""
    cls = JsonlTask if problem.task == "jsonl" else TASKS.get(problem.task)
    if cls is None:
        raise ValueError(f"no solver for task {problem.task!r}; known tasks: {sorted(TASKS) + ['jsonl']}")
    return cls.solution(problem)


def make_task(name: str, split: str = "train", difficulty: int = 1) -> Task:
    """A generated task by name, or a JSONL task when `name` is a path ending in .jsonl."""
    if name.endswith(".jsonl"):
        return JsonlTask(name, split=split)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or a path to a .jsonl file")
    return TASKS[name](split=split, difficulty=difficulty)


# ----------------------------------------------------------------------------------------------------------------
# Rewards (rule-based only, R1 sec. 2.2.2)

_FORMAT = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def extract_answer(completion: str) -> str | None:
    """Content of the LAST complete <answer>...</answer> block, or None. The last one counts (the model's final
    word); hedging with several answers gains nothing because the format reward requires exactly one."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return completion[start + len("<answer>") : end]


def accuracy_reward(problem: Problem, completion: str) -> float:
    """1.0 if the last answer block is correct, else 0.0 (an answer outside the tags earns nothing)."""
    answer = extract_answer(completion)
    return float(answer is not None and check(problem, answer))


def format_reward(completion: str) -> float:
    """1.0 for exactly `<think>T</think><answer>A</answer>` with only whitespace around and between, T and A not
    blank and containing no tags; else 0.0. No partial credit: R1-Zero's format reward is a rule that holds or
    not, and partial credit for fragments is easy to farm (e.g. an empty <think></think> prefix). A generation
    prompt that pre-fills "<think>" must be prepended to the completion by the caller."""
    m = _FORMAT.fullmatch(completion)
    if not m or not m["think"].strip() or not m["answer"].strip():
        return 0.0
    return float(not any(tag in m["think"] or tag in m["answer"] for tag in _TAGS))


DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.2}  # format is a shaping term; accuracy is the goal


def combined_reward(
    problem: Problem, completion: str, weights: dict[str, float] | None = None
) -> tuple[float, dict[str, float]]:
    """(weighted sum, {"accuracy": a, "format": f}) with DEFAULT_WEIGHTS unless given."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = set(weights) - {"accuracy", "format"}
    if unknown:
        raise ValueError(f"unknown reward weights {sorted(unknown)}; use 'accuracy' and/or 'format'")
    components = {"accuracy": accuracy_reward(problem, completion), "format": format_reward(completion)}
    return sum(weights.get(k, 0.0) * v for k, v in components.items()), components


class RewardError(RuntimeError):
    """A reward function failed on a completion: a bug to fix, never to be scored as 0."""


def score_completions(
    problems: list[Problem], completions: list[str], reward_fn: Callable[[Problem, str], object]
) -> list[float]:
    """reward_fn(problem, completion) for each pair, as floats (a (total, components) result gives total).
    An exception, or a result that is not a finite number, raises RewardError naming the completion."""
    if len(problems) != len(completions):
        raise ValueError(
            f"{len(problems)} problems but {len(completions)} completions; pass one problem per completion"
        )
    rewards = []
    for i, (problem, completion) in enumerate(zip(problems, completions)):
        shown = completion if len(completion) <= 200 else completion[:200] + f"... ({len(completion)} chars)"
        name = getattr(reward_fn, "__name__", repr(reward_fn))
        try:
            r = reward_fn(problem, completion)
            r = float(r[0] if isinstance(r, tuple) else r)
        except Exception as e:
            raise RewardError(f"{name} failed on completion {i} {shown!r}: {type(e).__name__}: {e}") from e
        if not math.isfinite(r):
            raise RewardError(f"{name} returned {r} for completion {i} {shown!r}")
        rewards.append(r)
    return rewards


# ----------------------------------------------------------------------------------------------------------------
# Chat messages (the tokenizer's chat template turns these into ids)


def to_messages(problem: Problem, system_prompt: str = DEFAULT_SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": problem.prompt}]


def sft_example(problem: Problem, system_prompt: str = DEFAULT_SYSTEM) -> list[dict[str, str]]:
    """System, user and the worked solution as the assistant turn."""
    return to_messages(problem, system_prompt) + [{"role": "assistant", "content": solution(problem)}]


# ----------------------------------------------------------------------------------------------------------------
# Statistics for reports


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval for an accuracy; sane at 0% and 100%, unlike the normal approximation."""
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total > 0, got {successes}/{total}")
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)
