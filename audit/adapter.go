package audit

import (
	"fmt"
	"maps"
	"math"
	"slices"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// Adapters are a checkpoint's adapter_model.safetensors, decoded: PEFT
// tensor name → values (as f32, whatever dtype was stored).
type Adapters map[string][]float32

// DecodeAdapters decodes an adapter_model.safetensors file's bytes. A node
// wrote it, so nothing in it is trusted: a header that does not parse or a
// tensor of a dtype no engine writes is an error.
func DecodeAdapters(file []byte) (Adapters, error) {
	h, err := safetensors.ParseHeader(file, int64(len(file)))
	if err != nil {
		return nil, fmt.Errorf("adapter file: %w", err)
	}
	out := make(Adapters, len(h.Tensors))
	for name, t := range h.Tensors {
		v := make([]float32, t.NumElements())
		off := h.DataOffset
		if err := safetensors.Convert(v, file[off+t.Begin:off+t.End], t.DType); err != nil {
			return nil, fmt.Errorf("adapter file: tensor %q: %w", name, err)
		}
		out[name] = v
	}
	return out, nil
}

// CompareAdapters compares the adapter a node committed after an
// optim_step (claimed) with the one the validator reached replaying the
// same calls from the same committed state (replay), relative to how far
// the replay moved from that state (pre): with d = ‖claimed − replay‖ and
// u = ‖replay − pre‖ over every tensor, it passes when
// d ≤ AdapterRel·u + AdapterAbs·√n (n values). An optimizer step the node
// skipped leaves d = u, one taken with a made-up gradient d ≈ √2·u; two
// honest engines differ only where Adam's g/√v is sensitive to rounding.
func CompareAdapters(pre, claimed, replay Adapters, tol Tolerances) Check {
	k := newChecker()
	names := slices.Sorted(maps.Keys(replay))
	if len(claimed) != len(replay) || len(pre) != len(replay) {
		k.fail(fmt.Sprintf("adapter: claimed %d tensors, pre-state %d, replay %d", len(claimed), len(pre), len(replay)))
		return k.c
	}
	var d2, u2 float64
	n := 0
	for _, name := range names {
		r, c, p := replay[name], claimed[name], pre[name]
		if len(c) != len(r) || len(p) != len(r) {
			k.fail(fmt.Sprintf("adapter %s: claimed %d values, pre-state %d, replay %d", name, len(c), len(p), len(r)))
			return k.c
		}
		for i := range r {
			dc, dp := float64(c[i])-float64(r[i]), float64(r[i])-float64(p[i])
			d2 += dc * dc
			u2 += dp * dp
		}
		n += len(r)
	}
	k.near1("adapter after optim_step: ‖claimed − replay‖", math.Sqrt(d2), tol.AdapterRel*math.Sqrt(u2)+tol.AdapterAbs*math.Sqrt(float64(n)))
	return k.c
}

// near1 checks one distance against its bound.
func (k *checker) near1(what string, diff, bound float64) {
	k.c.Figures++
	if math.IsNaN(diff) || math.IsInf(diff, 0) {
		k.fail(fmt.Sprintf("%s: distance %v", what, diff))
		return
	}
	if bound > 0 {
		k.c.Margin = math.Max(k.c.Margin, diff/bound)
	}
	if diff > bound {
		k.fail(fmt.Sprintf("%s %.3g > %.3g", what, diff, bound))
	}
}
