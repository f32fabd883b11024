"""Rule-based rewards: table tests of correct, wrong and hostile answers, with time bounds."""

import time

import pytest

from deepseek_jax.rl import rewards
from deepseek_jax.rl.rewards import (
    REWARDS,
    arithmetic_accuracy,
    countdown_accuracy,
    evaluate_expression,
    format_reward,
    get_reward,
    language_consistency,
    last_answer,
    tokenize_expression,
)

N = [3, 7, 25]  # 25 + 3 * 7 = 46
BIG = 5_000_000


def A(expr: str) -> str:
    return f"<think>reasoning</think>\n<answer>{expr}</answer>"


# (id, text, numbers, target, expected)
COUNTDOWN = [
    # correct, in several forms
    ("plain", A("25 + 3 * 7"), N, 46, 1.0),
    ("reordered", A("3 * 7 + 25"), N, 46, 1.0),
    ("no_spaces", A("(3*7)+25"), N, 46, 1.0),
    ("extra_parens", A("((3 * 7) + 25)"), N, 46, 1.0),
    ("redundant_parens", A("(((25))) + (7 * 3)"), N, 46, 1.0),
    ("newlines_tabs", A("\n\t25\t+\n3 *7 \n"), N, 46, 1.0),
    ("numbers_any_order", A("25+3*7"), [25, 7, 3], 46, 1.0),
    ("duplicates", A("5 + 5 + 2"), [5, 2, 5], 12, 1.0),
    ("negative_intermediate", A("20 + (3 - 7)"), [3, 7, 20], 16, 1.0),
    ("fraction_intermediate", A("(7 / 2) * 2"), [7, 2, 2], 7, 1.0),
    ("fraction_24", A("6 / (1 - 3 / 4)"), [1, 3, 4, 6], 24, 1.0),
    ("no_think_needed", "<answer>25 + 3 * 7</answer>", N, 46, 1.0),
    ("answer_not_last_tag", "<answer>25 + 3 * 7</answer> and then <think> more", N, 46, 1.0),
    ("last_block_counts", A("25 + 3 + 7") + " no wait <answer>25 + 3 * 7</answer>", N, 46, 1.0),
    ("last_block_wrong", A("25 + 3 * 7") + " <answer>25 + 3 + 7</answer>", N, 46, 0.0),
    ("unclosed_last_block", A("25 + 3 * 7") + " <answer>25 + 3 + 7", N, 46, 1.0),
    # trailing "= target": tolerated only when it is exactly the target
    ("eq_target", A("25 + 3 * 7 = 46"), N, 46, 1.0),
    ("eq_target_spaces", A("25 + 3 * 7 =46 \n"), N, 46, 1.0),
    ("eq_wrong_target", A("25 + 3 * 7 = 45"), N, 46, 0.0),
    ("eq_target_leading_zero", A("25 + 3 * 7 = 046"), N, 46, 0.0),
    ("eq_twice", A("25 + 3 * 7 = 46 = 46"), N, 46, 0.0),
    ("eq_on_left", A("46 = 25 + 3 * 7"), N, 46, 0.0),
    ("eq_wrong_expression", A("25 + 3 + 7 = 46"), N, 46, 0.0),
    # wrong
    ("wrong_value", A("(25 + 3) * 7"), N, 46, 0.0),
    ("number_reused", A("25 + 7 + 7 + 7"), N, 46, 0.0),
    ("number_missing", A("25 + 21"), N, 46, 0.0),
    ("subset_only", A("3 * 7"), N, 21, 0.0),
    ("extra_number", A("25 + 3 * 7 + 1 - 1"), N, 46, 0.0),
    ("extra_zero", A("25 + 3 * 7 + 0"), N, 46, 0.0),
    ("duplicate_misused", A("5 + 2 + 2"), [5, 2, 5], 9, 0.0),
    ("division_by_zero", A("3 / (4 - 4)"), [3, 4, 4], 3, 0.0),
    ("division_by_zero_times_zero", A("(3 / (4 - 4)) * 0"), [3, 4, 4, 0], 0, 0.0),
    ("non_integer_result", A("7 / 2"), [7, 2], 3, 0.0),
    ("leading_zero_literal", A("(07 / 2) * 2"), [7, 2, 2], 7, 0.0),
    ("unary_minus", A("-3 + 7"), [3, 7], 4, 0.0),
    ("double_minus", A("7 - -3"), [7, 3], 10, 0.0),
    ("unary_plus", A("+3 + 7"), [3, 7], 10, 0.0),
    ("negative_times", A("2 * -3 + 10"), [2, 3, 10], 4, 0.0),
    ("float_literal", A("25.0 + 3 * 7"), N, 46, 0.0),
    ("float_3_0", A("25 + 3.0 * 7"), N, 46, 0.0),
    ("scientific", A("2.5e1 + 3 * 7"), N, 46, 0.0),
    ("scientific_int", A("25 + 3 * 7 + 1e0 - 1e0"), N, 46, 0.0),
    ("unbalanced_open", A("(25 + 3 * 7"), N, 46, 0.0),
    ("unbalanced_close", A("25 + 3 * 7)"), N, 46, 0.0),
    ("empty_parens", A("()25 + 3 * 7"), N, 46, 0.0),
    ("double_operator", A("25 + + 3 * 7"), N, 46, 0.0),
    ("missing_operator", A("25 (3 * 7)"), N, 46, 0.0),
    ("implicit_product", A("25 + 3(7)"), N, 46, 0.0),
    ("unicode_times", A("25 + 3 × 7"), N, 46, 0.0),
    ("letter_x", A("25 + 3 x 7"), N, 46, 0.0),
    ("latex", A("$25 + 3 \\times 7$"), N, 46, 0.0),
    ("semicolon", A("25 + 3 * 7;"), N, 46, 0.0),
    ("nbsp", A("25\u00a0+ 3 * 7"), N, 46, 0.0),
    ("empty_answer", A(""), N, 46, 0.0),
    ("blank_answer", A("  \n "), N, 46, 0.0),
    ("no_answer", "<think>25 + 3 * 7 = 46</think>", N, 46, 0.0),
    ("unclosed_answer", "<answer>25 + 3 * 7", N, 46, 0.0),
    ("close_before_open", "</answer>25 + 3 * 7<answer>", N, 46, 0.0),
    ("too_many_tokens", A("+".join(["1"] * 40)), [1] * 40, 40, 0.0),
    ("depth_29_ok", A("(" * 29 + "25" + ")" * 29 + " + 3 * 7"), N, 46, 1.0),
    ("depth_33", A("(" * 33 + "25" + ")" * 33 + "+3*7"), N, 46, 0.0),
    ("magnitude_bound", A("999999*999999*999999*999999/999999/999999/999999"), [999999] * 7, 999999, 0.0),
]

HOSTILE = [
    ("eval", A("eval('25 + 3 * 7')"), N, 46, 0.0),
    ("import", A("__import__('os').system('echo pwned')"), N, 46, 0.0),
    ("os_system", A("os.system('rm -rf /')"), N, 46, 0.0),
    ("lambda", A("(lambda: 46)()"), N, 46, 0.0),
    ("power_tower", A("9**9**9"), [9, 9, 9], 46, 0.0),
    ("caret_power", A("2^1000"), [2, 1000], 46, 0.0),
    ("power_of_literals", A("(25 + 3 * 7) ** 1"), N, 46, 0.0),
    ("deep_parens_10k", A("(" * 10_000 + "25 + 3 * 7" + ")" * 10_000), N, 46, 0.0),
    ("deep_parens_unbalanced", A("(" * 100_000), N, 46, 0.0),
    ("huge_answer_5mb", A("1+" * (BIG // 2) + "1"), [1] * (BIG // 2 + 1), BIG // 2 + 1, 0.0),
    ("huge_prefix_5mb", "x" * BIG + A("25 + 3 * 7"), N, 46, 1.0),
    ("huge_partial_tags_5mb", "<answer" * (BIG // 7) + "</answer", N, 46, 0.0),
    ("huge_no_tags_5mb", "(" * BIG, N, 46, 0.0),
    ("arabic_indic", A("٢٥ + ٣ * ٧"), N, 46, 0.0),
    ("arabic_indic_one", A("25 + ٣ * 7"), N, 46, 0.0),
    ("superscript", A("25 + 3 * 7²"), N, 46, 0.0),
    ("fullwidth", A("２５ + 3 * 7"), N, 46, 0.0),
    ("fullwidth_one", A("25 + 3 * 7 + １ - 1"), N, 46, 0.0),
    ("nul_in_answer", A("25 + 3 * 7\x00"), N, 46, 0.0),
    ("nul_between", A("25\x00+ 3 * 7"), N, 46, 0.0),
    ("nul_outside", "\x00" * 1000 + A("25 + 3 * 7"), N, 46, 1.0),
    ("lone_surrogate_in", A("25 + 3 * 7\ud800"), N, 46, 0.0),
    ("lone_surrogate_out", "\udfff" + A("25 + 3 * 7") + "\ud800", N, 46, 1.0),
    ("long_literal_7", A("1234567 - 3 * 7"), [1234567, 3, 7], 1234546, 0.0),
    ("long_literal_5000", A("9" * 5000), [9], 9, 0.0),
    ("padded_literal", A("0000000025 + 3 * 7"), N, 46, 0.0),
    ("underscore_literal", A("2_5 + 3 * 7"), N, 46, 0.0),
    ("hex_literal", A("0x19 + 3 * 7"), N, 46, 0.0),
    ("none_text", None, N, 46, 0.0),
    ("bytes_text", b"<answer>25 + 3 * 7</answer>", N, 46, 0.0),
    ("bad_numbers", A("25 + 3 * 7"), None, 46, 0.0),
    ("bad_target", A("25 + 3 * 7 = 46"), N, "46", 0.0),
]

TABLE = COUNTDOWN + HOSTILE


def test_table_is_big_enough():
    assert len(TABLE) >= 40
    assert len({row[0] for row in TABLE}) == len(TABLE)


@pytest.mark.parametrize(("text", "numbers", "target", "expected"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_countdown_accuracy(text, numbers, target, expected):
    t0 = time.perf_counter()
    got = countdown_accuracy(text, numbers, target)
    elapsed = time.perf_counter() - t0
    assert got == expected
    assert isinstance(got, float)
    assert elapsed < 0.1


def test_countdown_table_is_fast():
    t0 = time.perf_counter()
    for _, text, numbers, target, expected in TABLE:
        assert countdown_accuracy(text, numbers, target) == expected
    assert time.perf_counter() - t0 < 1.0


def test_depth_and_token_bounds():
    assert tokenize_expression("(" * 31 + "1" + ")" * 31) is not None  # 63 tokens
    assert tokenize_expression("(" * 32 + "1" + ")" * 32) is None  # depth 32 is allowed, but that is 65 tokens
    assert tokenize_expression("(" * 33 + "1" + ")" * 33) is None  # nesting over MAX_DEPTH
    assert tokenize_expression("+".join(["1"] * 32)) is not None  # 63 tokens
    assert tokenize_expression("+".join(["1"] * 33)) is None  # 65 tokens
    assert tokenize_expression("999999") == [999999]
    assert tokenize_expression("1000000") is None
    assert tokenize_expression("1" * 600) is None
    assert tokenize_expression("0") == [0]


def test_evaluate_expression_is_exact():
    assert evaluate_expression("6 / (1 - 3 / 4)") == 24
    assert evaluate_expression("1 - 2 - 3") == -4  # left associative
    assert evaluate_expression("8 / 4 / 2") == 1
    assert evaluate_expression("2 + 3 * 4") == 14
    assert str(evaluate_expression("1 / 3")) == "1/3"
    assert evaluate_expression("1 / 0") is None
    assert evaluate_expression("__import__('os')") is None
    assert evaluate_expression(None) is None


def test_last_answer():
    assert last_answer("<answer>a</answer> x <answer> b </answer> y") == " b "
    assert last_answer("<answer>a</answer><answer>b") == "a"
    assert last_answer("no tags") is None
    assert last_answer("</answer><answer>") is None
    assert last_answer("<answer><answer>x</answer>") == "x"
    assert last_answer(None) is None


FORMAT = [
    ("valid", "<think>a</think><answer>b</answer>", 1.0),
    ("valid_whitespace", "  \n<think> a </think>\n\n<answer> b </answer>\n ", 1.0),
    ("valid_empty", "<think></think><answer></answer>", 1.0),
    ("valid_multiline", "<think>line 1\nline 2\n</think>\n<answer>\n42\n</answer>", 1.0),
    ("missing_think", "<answer>b</answer>", 0.0),
    ("missing_answer", "<think>a</think>", 0.0),
    ("missing_think_close", "<think>a<answer>b</answer>", 0.0),
    ("missing_answer_close", "<think>a</think><answer>b", 0.0),
    ("bare_text", "just an answer", 0.0),
    ("wrong_order", "<answer>b</answer><think>a</think>", 0.0),
    ("nested_think", "<think>a<think>b</think></think><answer>c</answer>", 0.0),
    ("answer_inside_think", "<think>a<answer>b</answer></think>", 0.0),
    ("answer_close_inside_think", "<think>a</answer></think><answer>b", 0.0),
    ("text_after_answer", "<think>a</think><answer>b</answer>c", 0.0),
    ("text_between", "<think>a</think> so <answer>b</answer>", 0.0),
    ("text_before", "Sure! <think>a</think><answer>b</answer>", 0.0),
    ("two_answers", "<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
    ("two_thinks", "<think>a</think><think>a</think><answer>b</answer>", 0.0),
    ("uppercase", "<THINK>a</THINK><answer>b</answer>", 0.0),
    ("nul_after", "<think>a</think><answer>b</answer>\x00", 0.0),
    ("surrogates_inside", "<think>\ud800</think><answer>\udfff</answer>", 1.0),
    ("huge_valid", "<think>" + "x" * BIG + "</think><answer>1</answer>", 1.0),
    ("huge_tags", "<think>" * (BIG // 7), 0.0),
    ("none", None, 0.0),
]


@pytest.mark.parametrize(("text", "expected"), [row[1:] for row in FORMAT], ids=[row[0] for row in FORMAT])
def test_format_reward(text, expected):
    t0 = time.perf_counter()
    assert format_reward(text) == expected
    assert time.perf_counter() - t0 < 0.1


LANGUAGE = [
    ("en", "<think>Let me add 3 and 4.</think><answer>7</answer>", "en", 1.0),
    ("zh", "<think>我们先把三和四相加</think><answer>7</answer>", "zh", 1.0),
    ("zh_as_en", "<think>我们先把三和四相加</think>", "en", 0.0),
    ("en_as_zh", "<think>add three and four</think>", "zh", 0.0),
    ("mixed_en", "<think>first 我们 add</think>", "en", 0.5),
    ("mixed_zh", "<think>first 我们 add</think>", "zh", 0.5),
    ("digits_in_zh", "<think>3 个苹果</think>", "zh", 0.75),
    ("accents", "<think>café au lait</think>", "en", 2 / 3),
    ("cyrillic", "<think>Привет world</think>", "en", 0.5),
    ("underscore_splits", "<think>foo_bar</think>", "en", 1.0),
    ("only_think_scored", "<think>hello</think><answer>我们</answer>", "en", 1.0),
    ("no_think_whole_text", "hello 世界", "en", 1 / 3),
    ("unclosed_think", "<think>hello 世界", "zh", 2 / 3),
    ("empty", "", "en", 0.0),
    ("empty_think", "<think></think><answer>hello</answer>", "en", 0.0),
    ("punctuation_only", "<think> ... !!! -- </think>", "en", 0.0),
    ("punctuation_only_unicode", "<think> … “” — </think>", "zh", 0.0),
    ("surrogates", "<think>\ud800 hello \udfff</think>", "en", 1.0),
    ("none", None, "en", 0.0),
]


@pytest.mark.parametrize(("text", "language", "expected"), [row[1:] for row in LANGUAGE],
                         ids=[row[0] for row in LANGUAGE])
def test_language_consistency(text, language, expected):
    assert language_consistency(text, language) == pytest.approx(expected)


def test_language_consistency_rejects_unknown_language():
    with pytest.raises(ValueError, match="en, zh"):
        language_consistency("hello", "fr")


@pytest.mark.parametrize("text", ["a 你" * (BIG // 3), "é " * (BIG // 2), "x" * BIG, "(" * BIG, "\ud800" * BIG],
                         ids=["mixed", "accented", "ascii_word", "ascii_punct", "surrogates"])
def test_language_consistency_is_fast_on_megabytes(text):
    t0 = time.perf_counter()
    score = language_consistency(text, "en")
    assert time.perf_counter() - t0 < 0.1
    assert 0.0 <= score <= 1.0
    if text.startswith("a 你"):
        assert score == pytest.approx(0.5, abs=0.01)  # estimated on windows, still close


ARITHMETIC = [
    ("plain", "<think>x</think><answer>42</answer>", 42, 1.0),
    ("spaces", "<answer> 42 \n</answer>", 42, 1.0),
    ("plus_sign", "<answer>+42</answer>", 42, 1.0),
    ("negative", "<answer>-17</answer>", -17, 1.0),
    ("leading_zeros", "<answer>0042</answer>", 42, 1.0),
    ("twenty_digits", "<answer>" + "9" * 20 + "</answer>", int("9" * 20), 1.0),
    ("last_block", "<answer>41</answer> oops <answer>42</answer>", 42, 1.0),
    ("wrong", "<answer>43</answer>", 42, 0.0),
    ("last_block_wrong", "<answer>42</answer><answer>43</answer>", 42, 0.0),
    ("sign_wrong", "<answer>-42</answer>", 42, 0.0),
    ("float", "<answer>42.0</answer>", 42, 0.0),
    ("inner_space", "<answer>4 2</answer>", 42, 0.0),
    ("expression", "<answer>40 + 2</answer>", 42, 0.0),
    ("scientific", "<answer>1e2</answer>", 100, 0.0),
    ("underscore", "<answer>1_000</answer>", 1000, 0.0),
    ("double_sign", "<answer>--42</answer>", 42, 0.0),
    ("arabic_indic", "<answer>٤٢</answer>", 42, 0.0),
    ("fullwidth", "<answer>４２</answer>", 42, 0.0),
    ("superscript", "<answer>4²</answer>", 42, 0.0),
    ("twenty_one_digits", "<answer>" + "9" * 21 + "</answer>", int("9" * 21), 0.0),
    ("huge_literal", "<answer>" + "9" * BIG + "</answer>", 9, 0.0),
    ("unclosed", "<answer>42", 42, 0.0),
    ("empty", "<answer></answer>", 0, 0.0),
    ("nul", "<answer>42\x00</answer>", 42, 0.0),
    ("none", None, 42, 0.0),
]


@pytest.mark.parametrize(("text", "answer", "expected"), [row[1:] for row in ARITHMETIC],
                         ids=[row[0] for row in ARITHMETIC])
def test_arithmetic_accuracy(text, answer, expected):
    t0 = time.perf_counter()
    assert arithmetic_accuracy(text, answer) == expected
    assert time.perf_counter() - t0 < 0.1


HOSTILE_TEXTS = [row[1] for row in HOSTILE] + [
    "<think>" + "(" * BIG + "</think><answer>" + "٣" * 1000 + "</answer>",
    "\x00" * BIG,
    "<answer>" * 10_000 + "</answer>" * 10_000,
]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_survives_hostile_text(name):
    fn = get_reward(name)
    args = {"countdown_accuracy": {"numbers": N, "target": 46}, "arithmetic_accuracy": {"answer": 46},
            "format": {}, "language_consistency": {"language": "en"}}[name]
    for text in HOSTILE_TEXTS:
        t0 = time.perf_counter()
        value = fn(text, **args)
        assert time.perf_counter() - t0 < 0.1, (name, repr(text)[:60])
        assert isinstance(value, float) and 0.0 <= value <= 1.0


def test_registry():
    assert REWARDS["format"] is format_reward
    with pytest.raises(ValueError, match="countdown_accuracy"):
        get_reward("nope")
    assert rewards.MAX_TOKENS == 64 and rewards.MAX_DEPTH == 32
