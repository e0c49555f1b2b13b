import torch

from rlxf.logprobs import LOGSOFTMAX_CHUNK_ROWS, sequence_logprobs, shift_for_next_token, token_logprobs


def naive_token_logprobs(logits, labels):
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            row = logits[b, t].double()
            out[b, t] = row[labels[b, t]] - torch.log(torch.exp(row).sum())
    return out


def test_token_logprobs_matches_naive_loop_across_chunks():
    g = torch.Generator().manual_seed(0)
    batch = LOGSOFTMAX_CHUNK_ROWS * 2 + 1  # crosses two chunk boundaries
    logits = torch.randn(batch, 5, 11, generator=g)
    labels = torch.randint(0, 11, (batch, 5), generator=g)
    torch.testing.assert_close(token_logprobs(logits, labels).double(), naive_token_logprobs(logits, labels))


def test_token_logprobs_upcasts_low_precision():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive_token_logprobs(logits.float(), labels))


def test_sequence_logprobs_same_under_left_and_right_padding():
    g = torch.Generator().manual_seed(0)
    vocab, pad = 9, 0
    seqs = [[3, 4, 5], [6, 7, 8, 2, 1]]
    per_token = [torch.randn(len(s), vocab, generator=g) for s in seqs]
    width = max(map(len, seqs))
    results = []
    for side in ("left", "right"):
        logits = torch.full((2, width, vocab), 100.0)  # junk under the padding must not matter
        labels = torch.full((2, width), pad)
        mask = torch.zeros(2, width)
        for i, (s, lg) in enumerate(zip(seqs, per_token)):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            logits[i, sl], labels[i, sl], mask[i, sl] = lg, torch.tensor(s), 1
        results.append(sequence_logprobs(logits, labels, mask))
    torch.testing.assert_close(results[0], results[1])
    expected = torch.stack([naive_token_logprobs(lg[None], torch.tensor([s])).sum() for s, lg in zip(seqs, per_token)])
    torch.testing.assert_close(results[0].double(), expected)


def test_sequence_logprobs_ignores_negative_labels_under_mask():
    logits = torch.randn(1, 3, 4)
    labels = torch.tensor([[1, -100, 2]])
    mask = torch.tensor([[1, 0, 1]])
    expected = naive_token_logprobs(logits, torch.tensor([[1, 0, 2]]))[0, [0, 2]].sum()
    torch.testing.assert_close(sequence_logprobs(logits, labels, mask).double(), expected[None])


def test_shift_for_next_token_aligns_prediction_with_next_token():
    ids = torch.tensor([[10, 11, 12, 13]])
    logits = torch.arange(4.0)[None, :, None].expand(1, 4, 2)
    target = torch.tensor([[0, 0, 1, 1]])
    lg, labels, mask = shift_for_next_token(logits, ids, target)
    assert labels.tolist() == [[11, 12, 13]] and mask.tolist() == [[0, 1, 1]]
    assert lg[0, :, 0].tolist() == [0.0, 1.0, 2.0]  # position t predicts token t + 1
