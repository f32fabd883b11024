"""A character tokenizer and a task a tiny model learns in a few GRPO steps ("answer with the digit shown")."""

from deepseek_jax.rl.tasks import Problem

CHARS = "0123456789<>/abcdefghijklmnopqrstuvwxyz :"


class CharTokenizer:
    """One token per character; pad 0, eos 1."""

    pad_id, eos_id, bos_id, vocab_size = 0, 1, -1, len(CHARS) + 2

    def encode(self, text):
        return [CHARS.index(c) + 2 for c in text if c in CHARS]

    def decode(self, ids):
        return "".join(CHARS[i - 2] for i in ids if i >= 2)


class DigitTask:
    """Prompt "d:"; accuracy 1 when the completion starts with d, format 1 when it is a single token."""

    reward_names = ("accuracy", "format")

    def _problem(self, i):
        d = str(i % 10)
        return Problem(prompt=f"{d}:", reward_args={"digit": d}, answer=d, key=(d,))

    def train_problem(self, i):
        return self._problem(i * 7 + 3)

    def eval_problems(self):
        return [self._problem(i) for i in range(10)]

    def score(self, problem, completion):
        return {"accuracy": float(completion[:1] == problem.reward_args["digit"]),
                "format": float(len(completion) == 1)}
