"""Modelfile text: `render` writes what `parse` reads back unchanged."""

import pytest

from myllm.modelfile import Modelfile, parse, render

TEMPLATE = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("system", ["You are Mario.", 'Say "hi"', '"quoted"', "\nstarts on a new line", 'a """ b'])
def test_render_reads_back(system: str) -> None:
    mf = Modelfile(
        base="/models/blobs/sha256-" + "a" * 64,
        parameters={"temperature": 0.2, "stop": ["<|im_end|>", 'a "b"'], "num_predict": 64},
        template=TEMPLATE,
        system=system,
        messages=[{"role": "user", "content": "two\nlines"}, {"role": "assistant", "content": "ok"}],
        license="MIT\nsecond line",
    )
    text = render(mf)
    assert parse(text) == mf
    assert f'TEMPLATE """{TEMPLATE}"""' in text, "a template is kept verbatim, its '\\n' escapes included"


def test_render_leaves_out_what_is_unset() -> None:
    assert render(Modelfile(base="smollm2:135m")) == "FROM smollm2:135m\n"
