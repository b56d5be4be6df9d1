"""Spans read by a text encoder with its own tokenizer.

When the decoder and the text encoder share a vocabulary, a span's encoder
input is its decoder tokens and each token's encoder row lands on its own
position (one to one). A pretrained encoder (BERT, RoBERTa, ELECTRA) has its
own tokenizer: the span's text is tokenized again with the encoder's, and the
span occupies as many decoder positions as the encoder produces, as a run of
placeholder tokens (the way an image occupies ``tokens_per_image`` positions).
The span's decoder tokens leave the decoder's input, as with a shared
vocabulary; the token after the span is still predicted from its last position.

Worked example (decoder tokens ``a b c d e``, span ``[1, 3)`` = "b c", which the
encoder tokenizes into three tokens x y z)::

    decoder input   a  P  P  P  d  e        (P: placeholder rows, fed x y z's features)
    encoder input   x  y  z
    span            [1, 4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metalm_fast.masks import SpanMask

__all__ = ["SpanRetokenizer", "retokenize_spans"]


class SpanRetokenizer:
    """Decoder token ids of a span -> the text encoder's token ids of the same text.

    ``decoder_tokenizer`` has ``decode(ids) -> str`` (metalm_fast.data.Tokenizer);
    ``encoder_tokenizer`` is a ``tokenizers.Tokenizer`` (the encoder's tokenizer.json),
    whose post-processor adds the encoder's own framing ([CLS] ... [SEP] for BERT):
    the encoder reads each span as it read a sequence in pretraining.
    """

    def __init__(self, decoder_tokenizer, encoder_tokenizer):
        self.decoder_tokenizer, self.encoder_tokenizer = decoder_tokenizer, encoder_tokenizer

    def __call__(self, ids: Sequence[int]) -> list[int]:
        text = self.decoder_tokenizer.decode(list(ids))
        return self.encoder_tokenizer.encode(text, add_special_tokens=True).ids


def retokenize_spans(
    documents: list[list[int]],
    span_starts: Sequence[int],
    span_ends: Sequence[int],
    encode_span: Callable[[Sequence[int]], list[int]],
    placeholder_id: int,
) -> tuple[list[list[int]], list[int], list[int], list[list[int]]]:
    """Each span's decoder tokens replaced by a placeholder run as long as its encoder tokens.

    Parameters
    ----------
    documents : decoder token lists, packed in this order.
    span_starts, span_ends : absolute packed offsets, sorted or not; validated first
        (integers, inside one document, not overlapping) as SpanMask.semi_causal does.
    encode_span : decoder ids of one span -> its encoder ids (:class:`SpanRetokenizer`).
    placeholder_id : the decoder token written at the new span positions (its embedding
        is replaced by the encoder's rows; any id in the vocabulary serves).

    Returns
    -------
    (documents, span_starts, span_ends, encoder_spans): the new documents, the spans'
    new absolute offsets (sorted), and each span's encoder ids, in span order. A span
    whose text gives no encoder token is dropped (its tokens stay in the decoder).
    """
    lengths = torch.tensor([0, *map(len, documents)], dtype=torch.int64)
    SpanMask.semi_causal(lengths.cumsum(0), span_starts, span_ends)  # raises, naming them
    spans = sorted(zip(span_starts, span_ends, strict=True))
    packed = [token for document in documents for token in document]
    boundaries = [0]
    for document in documents:
        boundaries.append(boundaries[-1] + len(document))
    new_documents, starts, ends, encoder_spans = [], [], [], []
    offset, span = 0, 0  # offset: tokens written so far; span: next span to place
    for begin, end in zip(boundaries[:-1], boundaries[1:]):
        document, cursor = [], begin
        while span < len(spans) and spans[span][0] < end:
            start, stop = spans[span]
            encoder_ids = encode_span(packed[start:stop])
            document += packed[cursor:start]
            if encoder_ids:
                starts.append(offset + len(document))
                document += [placeholder_id] * len(encoder_ids)
                ends.append(offset + len(document))
                encoder_spans.append(encoder_ids)
            else:
                document += packed[start:stop]
            cursor, span = stop, span + 1
        document += packed[cursor:end]
        new_documents.append(document)
        offset += len(document)
    return new_documents, starts, ends, encoder_spans
