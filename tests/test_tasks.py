"""Verifiable tasks (Countdown, Arithmetic) and the synthetic arithmetic pretraining corpus."""

import re
import string
from collections import Counter

import pytest

from deepseek_jax.data.errors import DataError
from deepseek_jax.data.sources import synthetic_documents
from deepseek_jax.data.synthetic import arithmetic_corpus
from deepseek_jax.rl.coldstart import chains, coldstart_examples
from deepseek_jax.rl.curriculum import Curriculum
from deepseek_jax.rl.rewards import THINK_OPEN, evaluate_expression, format_reward
from deepseek_jax.rl.tasks import (
    TASKS,
    TEMPLATES,
    Arithmetic,
    Countdown,
    Problem,
    full_response,
    make_task,
)


def solved(problem: Problem) -> str:
    """A completion (what follows the prompt's <think>) that gives the reference answer in the R1 format."""
    return f" let me work it out </think>\n<answer> {problem.answer} </answer>"


@pytest.fixture(scope="module")
def countdown() -> Countdown:
    return Countdown(seed=0)


@pytest.fixture(scope="module")
def arithmetic() -> Arithmetic:
    return Arithmetic(seed=0)


# ------------------------------------------------------------------------------------------------- countdown


def test_countdown_is_deterministic_per_seed(countdown):
    again = Countdown(seed=0)
    assert [countdown.train_problem(i) for i in range(50)] == [again.train_problem(i) for i in range(50)]
    assert countdown.eval_problems() == again.eval_problems()
    other = Countdown(seed=1)
    assert [p.key for p in other.eval_problems()] != [p.key for p in countdown.eval_problems()]
    assert [other.train_problem(i).key for i in range(20)] != [countdown.train_problem(i).key for i in range(20)]
    # problem i does not depend on which problems were asked for before it
    assert Countdown(seed=0).train_problem(123) == countdown.train_problem(123)


def test_countdown_reference_answers_score_one(countdown):
    problems = [countdown.train_problem(i) for i in range(400)] + countdown.eval_problems()[:100]
    for p in problems:
        assert countdown.score(p, solved(p)) == {"accuracy": 1.0, "format": 1.0}, p
        literals = [int(x) for x in re.findall(r"\d+", p.answer)]
        assert Counter(literals) == Counter(p.reward_args["numbers"])  # each number exactly once
        assert evaluate_expression(p.answer) == p.reward_args["target"]
        assert countdown.score(p, " </think> <answer> 0 </answer>")["accuracy"] == 0.0


def test_countdown_bounds(countdown):
    problems = [countdown.train_problem(i) for i in range(500)]
    sizes = Counter(len(p.reward_args["numbers"]) for p in problems)
    assert set(sizes) == {3, 4}
    for p in problems:
        numbers, target = p.reward_args["numbers"], p.reward_args["target"]
        assert all(isinstance(x, int) and 1 <= x <= 25 for x in numbers)
        assert isinstance(target, int) and 1 <= target <= 100
        assert p.key == (tuple(sorted(numbers)), target)
    assert len({p.reward_args["target"] for p in problems}) > 50  # targets are spread out

    small = Countdown(seed=5, num_numbers=(2, 5), max_number=10, max_target=30, eval_size=50)
    for i in range(200):
        p = small.train_problem(i)
        assert 2 <= len(p.reward_args["numbers"]) <= 5
        assert all(1 <= x <= 10 for x in p.reward_args["numbers"])
        assert 1 <= p.reward_args["target"] <= 30
        assert small.score(p, solved(p))["accuracy"] == 1.0


def test_countdown_train_and_eval_are_disjoint(countdown):
    evals = countdown.eval_problems()
    eval_keys = {p.key for p in evals}
    assert len(evals) == 200 and len(eval_keys) == 200
    assert not eval_keys & {countdown.train_problem(i).key for i in range(5000)}


def test_countdown_templates(countdown):
    p = countdown.train_problem(0)
    numbers, target = p.reward_args["numbers"], p.reward_args["target"]
    assert p.prompt.endswith("\nAssistant: <think>")
    assert f"Using the numbers [{', '.join(map(str, numbers))}], create an equation that equals {target}." in p.prompt
    assert "<answer>" in p.prompt and "</answer>" in p.prompt  # the format is described to the model

    compact = Countdown(seed=0, template="compact", eval_size=10).train_problem(0)
    numbers, target = compact.reward_args["numbers"], compact.reward_args["target"]
    assert compact.prompt == f"Make {target} from {' '.join(map(str, numbers))} with + - * /, each once.\n<think>"

    with pytest.raises(ValueError, match="compact, r1"):
        Countdown(seed=0, template="nope")


def test_score_prepends_the_prompted_think_tag(countdown):
    p = countdown.train_problem(1)
    assert full_response(p.prompt, "x</think><answer>1</answer>") == "<think>x</think><answer>1</answer>"
    assert full_response("no tag here", "abc") == "abc"
    assert countdown.score(p, solved(p))["format"] == 1.0
    assert countdown.score(p, THINK_OPEN + solved(p))["format"] == 0.0  # a second <think>
    assert countdown.score(p, f"<answer>{p.answer}</answer>") == {"accuracy": 1.0, "format": 0.0}
    assert countdown.score(p, solved(p) + " trailing words")["format"] == 0.0


def test_countdown_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_numbers"):
        Countdown(num_numbers=(1, 3))
    with pytest.raises(ValueError, match="num_numbers"):
        Countdown(num_numbers=(4, 3))
    with pytest.raises(ValueError, match="max_number"):
        Countdown(max_number=0)
    with pytest.raises(ValueError, match="too small"):
        Countdown(num_numbers=2, max_number=2, max_target=2, eval_size=200)


# ------------------------------------------------------------------------------------------------ arithmetic


def test_arithmetic_is_deterministic_and_correct(arithmetic):
    again = Arithmetic(seed=0)
    assert [arithmetic.train_problem(i) for i in range(50)] == [again.train_problem(i) for i in range(50)]
    assert arithmetic.eval_problems() == again.eval_problems()
    assert Arithmetic(seed=1).eval_problems() != arithmetic.eval_problems()
    for i in range(500):
        p = arithmetic.train_problem(i)
        a, op, b = p.key
        assert op in "+-*" and 10 <= a <= 999 and 10 <= b <= 999
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert p.reward_args == {"answer": expected} and p.answer == str(expected)
        assert arithmetic.score(p, solved(p)) == {"accuracy": 1.0, "format": 1.0}
        assert arithmetic.score(p, f" </think> <answer> {expected + 1} </answer>")["accuracy"] == 0.0


def test_arithmetic_settings_and_disjointness(arithmetic):
    eval_keys = {p.key for p in arithmetic.eval_problems()}
    assert len(eval_keys) == 200
    assert not eval_keys & {arithmetic.train_problem(i).key for i in range(5000)}

    task = Arithmetic(seed=2, digits=3, ops=("*",), eval_size=20, template="compact")
    p = task.train_problem(0)
    a, op, b = p.key
    assert op == "*" and 100 <= a <= 999 and 100 <= b <= 999
    assert p.prompt == f"Compute {a} * {b}.\n<think>"
    assert task.score(p, solved(p))["accuracy"] == 1.0
    assert p.prompt.startswith("Compute") and arithmetic.train_problem(0).prompt.endswith("Assistant: <think>")
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops=("/",))
    with pytest.raises(ValueError, match="digits"):
        Arithmetic(digits=(0, 2))


def test_registry():
    assert TASKS == {"countdown": Countdown, "arithmetic": Arithmetic}
    task = make_task("countdown", seed=3, eval_size=5)
    assert isinstance(task, Countdown) and len(task.eval_problems()) == 5
    assert task.reward_names == ("accuracy", "format")
    assert isinstance(make_task("arithmetic", eval_size=5), Arithmetic)
    with pytest.raises(ValueError, match="arithmetic, countdown"):
        make_task("sudoku")


def test_every_template_renders_for_every_task():
    for template in TEMPLATES:
        for name in TASKS:
            task = make_task(name, seed=0, eval_size=3, template=template)
            for p in task.eval_problems():
                assert p.prompt.endswith(THINK_OPEN) and "{" not in p.prompt
                assert task.score(p, solved(p)) == {"accuracy": 1.0, "format": 1.0}


# -------------------------------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return arithmetic_corpus(seed=0, n_docs=300)


def test_corpus_is_deterministic(corpus):
    assert arithmetic_corpus(seed=0, n_docs=300) == corpus
    assert arithmetic_corpus(seed=0, n_docs=10) == corpus[:10]  # document k depends only on (seed, k)
    assert arithmetic_corpus(seed=1, n_docs=10) != corpus[:10]
    assert len(set(corpus)) == len(corpus)
    assert all(1000 <= len(doc) <= 3000 for doc in corpus)


def test_corpus_contains_the_tags_in_format(corpus):
    with_tags = [doc for doc in corpus if "<think>" in doc and "<answer>" in doc]
    assert len(with_tags) > len(corpus) // 2
    examples = re.findall(r"^(?:Compute|Calculate|What is) (.+?)[.?]\n(<think>.*?</answer>)$",
                          "\n\n".join(corpus), flags=re.M)
    assert len(examples) > 100
    for expression, block in examples:
        assert format_reward(block) == 1.0
        value = evaluate_expression(expression)
        assert value is not None and value.denominator == 1 and value >= 0
        assert block.endswith((f"<answer> {value} </answer>", f"<answer> {expression} = {value} </answer>"))
        assert all(1 <= int(x) <= 100 for x in re.findall(r"\d+", expression))  # operands in [1, 100]
        assert 2 <= len(re.findall(r"\d+", expression)) <= 4


def test_corpus_combine_lines_use_the_listed_numbers(corpus):
    """"Combine 8, 11 and 7: 7 * (11 + 8) = 133": the listed numbers are the expression's, and the value is right."""
    text = "\n\n".join(corpus)
    found = re.findall(r"^Combine ([\d, and]+?)(?::|\.\n<think>.*?<answer>) (.+?) = (\d+)(?:\.| </answer>)$", text,
                       flags=re.M)
    assert len(found) > 200
    for listed, expression, value in found:
        assert sorted(re.findall(r"\d+", listed)) == sorted(re.findall(r"\d+", expression))
        assert evaluate_expression(expression) == int(value)


def _countdown_phrases() -> set[str]:
    """The fixed wording of every countdown template (the literal text between its fields), plus the telltale
    words of the task."""
    phrases = {"using the numbers", "create an equation", "exactly once", "each once", "each number", "make ",
               " from ", "target", "equation", "numbers [", "reach"}
    for per_task in TEMPLATES.values():
        for literal, *_ in string.Formatter().parse(per_task["countdown"]):
            for sentence in re.split(r"[.\n]", literal):
                if len(sentence.strip()) >= 8:
                    phrases.add(sentence.strip().lower())
    return phrases


def test_corpus_never_poses_countdown(corpus):
    phrases = _countdown_phrases()
    assert "use each number exactly once" in " ".join(phrases)
    for doc in corpus + [d for mix in ("combine", "explore", "explore10") for d in arithmetic_corpus(0, 100, mix)]:
        lowered = doc.lower()
        assert not [ph for ph in phrases if ph in lowered], doc
        assert "[" not in doc  # no number lists at all


_STATEMENT = re.compile(r"([0-9()+\-*/ ]+) = (\d+)")


def test_corpus_arithmetic_is_correct(corpus):
    checked = simple = 0
    for doc in corpus:
        for line in doc.splitlines():
            m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line)
            if m:
                a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, line
                simple += 1
            for lhs, rhs in _STATEMENT.findall(line):
                assert evaluate_expression(lhs) == int(rhs), line
                checked += 1
    assert simple > 1000 and checked > 5000
    text = "\n".join(corpus)
    assert all(op in text for op in (" + ", " - ", " * ", " / "))


def test_combine_mix_is_small_number_combinations_and_tables():
    """synthetic:combine, the laptop-scale base corpus: only "Combine ..." lines (operands in [1, 12], each listed
    number used once, the value right) and times tables."""
    docs = synthetic_documents("synthetic:combine:50")
    assert list(docs) == arithmetic_corpus(seed=0, n_docs=50, mix="combine") != arithmetic_corpus(seed=0, n_docs=50)
    lines = [line for doc in docs for line in doc.split("\n")[1:] if line]
    combine = [line for line in lines if line.startswith("Combine ")]
    assert len(combine) > 300 and all(1 <= int(n) <= 12 for line in combine for n in re.findall(r"\d+", line[8:]
                                                                                              .split(":")[0]))
    table = re.compile(r"^(?:Multiples of \d+:|(\d+) \* (\d+) = (\d+))$")
    other = [line for line in lines if not line.startswith(("Combine ", "<think>")) and not table.match(line)]
    assert not other, other[:5]
    with pytest.raises(DataError, match="synthetic:MIX"):
        synthetic_documents("synthetic:fractions:10")
    with pytest.raises(ValueError, match="unknown corpus mix 'x'; available: arithmetic, combine, explore"):
        arithmetic_corpus(0, 1, mix="x")


@pytest.mark.parametrize("mix, max_number, labels", [("explore", 12, False), ("explore10", 10, True)])
def test_explore_mix_tries_several_combinations_of_the_same_numbers(mix, max_number, labels):
    """synthetic:explore(10): each exploration evaluates 1-8 combinations of the listed numbers (2-3 in [1, 12] or
    [1, 10], each used once, step by step, every step right) with different values, and its answer restates the
    last one as one expression; explore10 puts an exercise number in front of about half; no target is named."""
    text = "\n\n".join(arithmetic_corpus(seed=0, n_docs=60, mix=mix))
    found = re.findall(r"^((?:\w+ \d+\. )?)Combine ([\d, and]+)\.\n<think> (.+?) </think> <answer> (.+?) = (\d+) "
                       r"</answer>$", text, flags=re.M)
    multi = labelled = three = 0
    for label, listed, think, expression, value in found:
        listed = sorted(int(n) for n in re.findall(r"\d+", listed))
        assert 2 <= len(listed) <= 3 and all(1 <= n <= max_number for n in listed)
        labelled += bool(label)
        three += len(listed) == 3
        finals = []
        for attempt in think.removesuffix(".").split(". "):
            steps = [re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", step).groups() for step in attempt.split(", ")]
            pool, previous = list(listed), None
            for a, op, b, v in steps:  # each step joins the previous result (if any) with one unused listed number
                a, b, v = int(a), int(b), int(v)
                assert evaluate_expression(f"{a} {op} {b}") == v, attempt
                assert previous is None or previous in (a, b), attempt
                for x in ([a, b] if previous is None else [b if a == previous else a]):
                    pool.remove(x)
                previous = v
            assert not pool, attempt  # every listed number used once
            finals.append(previous)
        assert len(set(finals)) == len(finals) <= 8
        assert evaluate_expression(expression) == int(value) == finals[-1]
        assert sorted(int(n) for n in re.findall(r"\d+", expression)) == listed
        multi += len(finals) > 1
    assert len(found) > 100 and multi > len(found) / 2
    assert (len(found) / 3 < labelled < 2 * len(found) / 3) if labels else not labelled
    assert three > (0.65 if labels else 0.35) * len(found)  # explore10: 3 numbers in three of four sets


def test_chains_enumerate_left_to_right_combinations():
    """Every left-to-right combination of (2, 3), checked by hand; all of (4, 6, 8) evaluate to their value, step
    by step."""
    assert sorted(chains([2, 3])) == sorted([("2 + 3", 5, ("2 + 3 = 5",)), ("3 + 2", 5, ("3 + 2 = 5",)),
                                             ("2 * 3", 6, ("2 * 3 = 6",)), ("3 * 2", 6, ("3 * 2 = 6",)),
                                             ("3 - 2", 1, ("3 - 2 = 1",))])
    three = list(chains([4, 6, 8]))
    assert len(three) > 40 and all(evaluate_expression(e) == v and v >= 0 for e, v, _ in three)
    assert ("(8 - 4) * 6", 24, ("8 - 4 = 4", "4 * 6 = 24")) in three
    assert not [e for e, _, _ in three if e == "(6 + 8) / 2"]


def test_coldstart_traces_search_and_check_then_answer():
    """R1's cold start: every trace is in the format, solves its problem, and checks each try against the target."""
    task = Countdown(seed=0, num_numbers=3, max_number=10, max_target=50, eval_size=20, template="reach")
    examples = coldstart_examples(task, 150)
    assert examples == coldstart_examples(task, 150)  # deterministic
    lengths = set()
    problems = iter(task.train_problem(i) for i in range(10_000))
    for ex in examples:
        problem = next(p for p in problems if p.prompt == ex["prompt"])  # in stream order, a few skipped
        assert task.score(problem, ex["response"]) == {"accuracy": 1.0,
                                                                                          "format": 1.0}
        target = problem.reward_args["target"]
        tries = re.findall(r"((?:\d+ [-+*/] \d+ = \d+, )+)(not|that is) (\d+)\.", ex["response"].split("</think>")[0])
        assert tries and all(int(t) == target for *_, t in tries)
        assert [word for _, word, _ in tries] == ["not"] * (len(tries) - 1) + ["that is"]
        for steps, word, _ in tries:
            values = [evaluate_expression(step.split(" = ")[0]) for step in steps.split(", ")[:-1]]
            assert values == [int(step.split(" = ")[1]) for step in steps.split(", ")[:-1]]
            assert (values[-1] == target) == (word == "that is")
        lengths.add(len(tries))
    assert lengths == set(range(1, 7))  # 0-5 misses, then the hit


def test_language_consistency_joins_the_rewards():
    task = Countdown(seed=0, num_numbers=3, eval_size=5, language="en")
    p = task.train_problem(0)
    assert task.reward_names == ("accuracy", "format", "language")
    assert task.score(p, solved(p)) == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert task.score(p, " 思考 </think> <answer> 1 </answer>")["language"] == 0.0
    with pytest.raises(ValueError, match="unsupported language 'fr'"):
        Countdown(seed=0, eval_size=5, language="fr")


def test_curriculum_rises_with_the_running_accuracy():
    """Levels by num_numbers; the running accuracy is an EMA (numpy reference) that restarts at each rise; the eval
    set is the final task's and no level draws from it; state() / load() carry it across a resume."""
    args = dict(num_numbers=3, max_number=6, max_target=30, eval_size=40, template="reach")
    cur = Curriculum("countdown", 0, args, arg="num_numbers", levels=(2, 3), advance_at=0.5, ema=0.8)
    assert cur.task.eval_problems() == Countdown(seed=0, **args).eval_problems()
    assert all(len(cur.train_problem(i).reward_args["numbers"]) == 2 for i in range(20))
    accs, running, level, seen = [0.2, 0.9, 1.0, 1.0, 1.0, 0.7, 1.0], 0.0, 0, []
    for a in accs:
        cur.observe(a)
        running = 0.8 * running + 0.2 * a
        if running >= 0.5 and level < 1:
            level, running = level + 1, 0.0
        seen.append(cur.level)
        assert cur.running == pytest.approx(running) and cur.level == level
    assert seen == [0, 0, 0, 0, 1, 1, 1]  # 0.04, 0.212, 0.370, 0.496, 0.597: rises at the fifth
    assert all(len(cur.train_problem(i).reward_args["numbers"]) == 3 for i in range(20))
    eval_keys = {p.key for p in cur.task.eval_problems()}
    assert not eval_keys & {cur.train_problem(i).key for i in range(3000)}
    again = Curriculum("countdown", 0, args, arg="num_numbers", levels=(2, 3), advance_at=0.5, ema=0.8)
    again.load(cur.state())
    assert again.state() == cur.state() and again.train_problem(5) == cur.train_problem(5)
    with pytest.raises(ValueError, match=r"rl\.curriculum\.arg is empty"):
        Curriculum("countdown", 0, args, levels=(2, 3))
