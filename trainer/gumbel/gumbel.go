// Package gumbel is the noise that seeded sampling draws with, defined
// once so that every engine — the native one here, the PyTorch worker
// (node/gpu/worker/signal_worker/gumbel.py) — and the auditor that checks
// them draw the same. A seeded sample's token at each position is the
// argmax over the allowed tokens of logprob/temperature + Noise(key,
// token): a draw from the softmax at that temperature (the Gumbel-max
// trick) that depends on the seed, the prompt's and the sample's index,
// the position and the token id alone — not on the engine, the batch or
// the order tokens are visited in. Two engines whose logprobs agree pick
// the same token except at near-ties, and a validator can check a node's
// pick from two logprobs (../../audit).
package gumbel

import "math"

// mix is SplitMix64's finaliser: a bijection of 64-bit words whose every
// output bit depends on every input bit.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// Key is the noise stream of one position of one sample: prompt is the
// prompt's index in the request, sample the sample's index among the
// prompt's num_samples, position the index of the token being drawn
// among the sample's tokens (0 for the first).
func Key(seed int64, prompt, sample, position int) uint64 {
	k := mix(uint64(seed))
	k = mix(k ^ uint64(prompt))
	k = mix(k ^ uint64(sample))
	return mix(k ^ uint64(position))
}

// Noise is the standard Gumbel variate of token under key: −log(−log u)
// with u uniform in (0, 1) from the token's hash (53 bits, never 0 or 1).
func Noise(key uint64, token int) float64 {
	u := (float64(mix(key^uint64(token))>>11) + 0.5) * 0x1p-53
	return -math.Log(-math.Log(u))
}
