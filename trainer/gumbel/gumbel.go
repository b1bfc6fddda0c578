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
	return -math.Log(-math.Log(uniform(key, token)))
}

func uniform(key uint64, token int) float64 {
	return (float64(mix(key^uint64(token))>>11) + 0.5) * 0x1p-53
}

// MayOvertake reports whether a token whose score (logprob/T) is x below
// the best score so far (x = score − best) may overtake it once its noise
// is added, that is whether Noise(key, token) may exceed −x: false means
// it cannot, so a Gumbel-max scan computes Noise (two logs) only for the
// few tokens that pass — about log(vocabulary) of them — and picks exactly
// the token a full scan picks. The test is a hash and a bound: the token
// wins only if −log u < e^x, and −log u ≥ 1 − u, so 1 − u ≥ e^x rules it
// out; e^x is bounded above by 2^⌊y⌋·(1 + y − ⌊y⌋), y = x·log₂e.
func MayOvertake(key uint64, token int, x float64) bool {
	if x >= 0 {
		return true
	}
	if x < -38 { // e^x below the least 1 − u, 2^-54
		return false
	}
	y := x * math.Log2E
	n := math.Floor(y)
	bound := math.Ldexp(1+(y-n), int(n))
	return 1-uniform(key, token) < bound
}
