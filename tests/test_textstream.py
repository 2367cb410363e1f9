from myllm.runtime.engine.textstream import TextAssembler


def feed_all(asm: TextAssembler, pieces: list[bytes]) -> list[str]:
    out = [asm.feed(p) for p in pieces]
    out.append(asm.finish())
    return [o for o in out if o]


def test_multibyte_split_across_tokens() -> None:
    data = "Hi 😀 你好".encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte per "token"
    out = feed_all(TextAssembler(), pieces)
    assert "".join(out) == "Hi 😀 你好"
    for piece in out:
        piece.encode("utf-8")  # every piece is whole characters
        assert "\ufffd" not in piece


def test_stop_split_across_tokens_never_emitted() -> None:
    asm = TextAssembler(stop=("<END>",))
    out = feed_all(asm, [b"abc <E", b"N", b"D> more"])
    assert "".join(out) == "abc "
    assert asm.stopped and asm.text == "abc "
    assert asm.stop_sequence == "<END>"


def test_false_alarm_prefix_is_released() -> None:
    asm = TextAssembler(stop=("STOP",))
    assert asm.feed(b"xST") == "x"
    assert asm.feed(b"ART") == "START"
    assert asm.finish() == ""
    assert not asm.stopped and asm.stop_sequence is None


def test_earliest_of_several_stops_wins() -> None:
    asm = TextAssembler(stop=("\n\n", "User:"))
    assert "".join(feed_all(asm, [b"one User: two\n\nthree"])) == "one "
    assert asm.stop_sequence == "User:"


def test_stops_starting_at_the_same_place_name_the_first_listed() -> None:
    asm = TextAssembler(stop=("ab", "a"))
    assert "".join(feed_all(asm, [b"x", b"ab"])) == "x"
    assert asm.stop_sequence == "ab"


def test_held_text_flushed_at_end() -> None:
    asm = TextAssembler(stop=("###",))
    assert asm.feed(b"end #") == "end "
    assert asm.finish() == "#"


def test_character_cut_by_token_limit_is_dropped() -> None:
    asm = TextAssembler()
    assert asm.feed(b"ok \xf0\x9f") == "ok "
    assert asm.finish() == ""
    assert asm.text == "ok "
