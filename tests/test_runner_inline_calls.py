"""Which runner calls the main thread answers itself (runner/child.py `INLINE_TEXT`): tokenizing
little text, whatever shape its arguments take over the channel; anything bigger, and every
other call, goes to the pool so a long call never delays a cancel."""

from myllm.runtime.runner.child import INLINE_TEXT, _text_size


def test_text_is_counted_in_every_argument_shape() -> None:
    assert _text_size(["hello"]) == 5  # tokenize
    assert _text_size([["ab", "cde"]]) == 5  # count
    units = [[["<|im_start|>user\n", True], ["hi there", False]], [["<|im_end|>", True]]]
    assert _text_size([units, 4096]) == len("<|im_start|>user\n") + len("hi there") + len("<|im_end|>")


def test_a_long_text_is_over_the_line() -> None:
    assert _text_size(["x" * (INLINE_TEXT + 1)]) > INLINE_TEXT
    assert _text_size([[["x" * INLINE_TEXT, False], ["y", True]], 10]) > INLINE_TEXT
