from ultraspeed.engine.text_stream import TextStream


class CharTokenizer:
    """One token per character (ids are code points), enough to test streaming rules."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed_all(stream, text):
    out = "".join(stream.feed([ord(c)]) for c in text)
    return out + stream.flush()


def test_plain_text_passes_through():
    assert feed_all(TextStream(CharTokenizer()), "hello world") == "hello world"


def test_stop_string_cuts_and_is_not_emitted():
    s = TextStream(CharTokenizer(), stop=("STOP",))
    assert feed_all(s, "abc STOP def") == "abc "
    assert s.stopped


def test_partial_stop_prefix_is_held_back_then_released():
    s = TextStream(CharTokenizer(), stop=("END",))
    assert s.feed([ord("a"), ord("E")]) == "a"          # "E" might start "END"
    assert s.feed([ord("N")]) == ""
    assert s.feed([ord("x")]) == "ENx"                   # it did not


def test_tokens_past_a_stop_string_in_one_block_are_surplus():
    """A speculative step commits several tokens at once: stop_tokens counts those up to the one completing the
    stop string, what one-token-at-a-time decoding would have produced."""
    s = TextStream(CharTokenizer(), stop=("STOP",))
    assert s.feed([ord(c) for c in "ab S"]) == "ab "
    assert s.feed([ord(c) for c in "TOP and more"]) == ""
    assert s.stopped and s.stop_tokens == len("ab STOP")
    one_by_one = TextStream(CharTokenizer(), stop=("STOP",))
    feed_all(one_by_one, "ab STOP")
    assert one_by_one.stopped and one_by_one.stop_tokens == s.stop_tokens


def test_the_earliest_of_several_stop_strings_cuts():
    s = TextStream(CharTokenizer(), stop=("later", "x"))
    assert s.feed([ord(c) for c in "a x b later c"]) == "a "
    assert s.stop_tokens == len("a x")
