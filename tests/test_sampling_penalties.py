"""The logits processors against values worked out by hand: OpenAI's frequency / presence penalties
(over the generated tokens only) and the CTRL repetition penalty (over a window of history)."""

import mlx.core as mx
import numpy as np

from mlx_gemma.sampling import SamplingParams, frequency_presence_processor, make_logits_processors, \
    repetition_penalty_processor


def test_frequency_and_presence_penalties_by_hand():
    # row 0: prompt [4, 4, 9], generated [4, 4, 7, 1]; row 1: prompt [2, 2, 2], generated [3, 3, 3, 3]
    history = mx.array([[4, 4, 9, 4, 4, 7, 1], [2, 2, 2, 3, 3, 3, 3]])
    logits = np.linspace(-1.0, 1.0, 20, dtype=np.float32).reshape(2, 10)
    out = np.array(frequency_presence_processor(0.5, 0.25, prompt_length=3)(history, mx.array(logits)))
    expected = logits.copy()
    expected[0, 4] -= 0.5 * 2 + 0.25  # generated twice (the prompt's two 4s do not count)
    expected[0, 7] -= 0.5 * 1 + 0.25
    expected[0, 1] -= 0.5 * 1 + 0.25
    expected[1, 3] -= 0.5 * 4 + 0.25  # token 2 appears only in the prompt: untouched; 9 likewise in row 0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_penalties_leave_logits_alone_before_anything_is_generated():
    history = mx.array([[5, 6, 7]])
    logits = mx.array(np.arange(10, dtype=np.float32)[None])
    out = frequency_presence_processor(2.0, 1.0, prompt_length=3)(history, logits)
    assert np.array_equal(np.array(out), np.array(logits))


def test_repetition_penalty_by_hand():
    """Window 3 over [5, 6, 7, 8, 8]: tokens 7 and 8 are seen (6 and 5 fell out of the window);
    a positive logit is divided by the penalty, a negative one multiplied, as transformers does."""
    history = mx.array([[5, 6, 7, 8, 8]])
    logits = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 3.0, 2.0, -1.5, 4.0, 0.9]], np.float32)
    out = np.array(repetition_penalty_processor(2.0, window=3)(history, mx.array(logits)))
    expected = logits.copy()
    expected[0, 7] = -3.0
    expected[0, 8] = 2.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_sampling_params_ask_for_the_processors_they_name():
    assert make_logits_processors(SamplingParams()) == []
    assert len(make_logits_processors(SamplingParams(frequency_penalty=0.1), prompt_length=4)) == 1
    assert len(make_logits_processors(SamplingParams(repetition_penalty=1.2, presence_penalty=0.3))) == 2
