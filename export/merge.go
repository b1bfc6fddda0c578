// Package export turns what Signal trains into files other programs run: a
// Hugging Face model directory with a LoRA adapter folded into the base
// weights (Merge), and llama.cpp's GGUF for a model (WriteGGUF) or for an
// adapter alone (WriteAdapterGGUF).
//
// Every export reads the model as the engine loaded it (trainer.LoadModel)
// and the adapter as the engine applies it (trainer.LoadAdapter), so what
// leaves is what Signal computes with: the same checked weights, the same
// LoRA scale, the same rope frequencies.
package export

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/safetensors"
)

// DefaultMaxShardBytes is the largest safetensors file Merge writes before
// it shards, transformers' save_pretrained default (5 GB).
const DefaultMaxShardBytes = 5_000_000_000

// MergeOptions says how Merge writes the merged directory.
type MergeOptions struct {
	// DType is F32, F16 or BF16; empty: the base model's torch_dtype.
	DType DType
	// MaxShardBytes bounds each safetensors file; 0: DefaultMaxShardBytes.
	MaxShardBytes int64
}

// hfFiles are the files of a model directory that describe rather than
// hold weights; Merge copies those present (config.json rewritten).
var hfFiles = []string{
	"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
	"tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
}

// hfTensor is one weight to write under its Hugging Face name.
type hfTensor struct {
	name  string
	shape []int
	data  func() []float32
}

func (t hfTensor) elements() int64 {
	n := int64(1)
	for _, d := range t.shape {
		n *= int64(d)
	}
	return n
}

// Merge writes into outDir (created; it must not exist or be empty) a Hugging
// Face model directory that is m with adapter l folded in: every adapted
// projection W becomes W + s·B·A with s the adapter's scale (alpha/r, or
// alpha/√r for rsLoRA), computed in float32 and rounded once to the output
// dtype; every other weight is copied. config.json (its dtype set to the
// output's), the tokenizer and generation files are copied, and the weights
// are written as model.safetensors, or as shards with
// model.safetensors.index.json when they exceed MaxShardBytes. The
// directory is assembled beside outDir and renamed into place, so a failed
// merge leaves nothing behind.
func Merge(m *trainer.Model, l *trainer.LoRA, outDir string, o MergeOptions) (err error) {
	if dt := m.WeightDType(); dt != "F32" {
		return fmt.Errorf("merge: %w: the model holds its weights as %s; load it with trainer.PrecisionF32 (widening is exact)", trainer.ErrInvalidInput, dt)
	}
	c := m.Config()
	dt := o.DType
	if dt == "" {
		dt = dtypeOfTorch(c.TorchDtype)
	}
	st, ok := map[DType]safetensors.DType{F32: safetensors.F32, F16: safetensors.F16, BF16: safetensors.BF16}[dt]
	if !ok {
		return fmt.Errorf("merge: %w: dtype %q (want f32, f16 or bf16)", trainer.ErrInvalidInput, dt)
	}
	if l != nil && len(l.Layers) != c.NumHiddenLayers {
		return fmt.Errorf("merge: %w: adapter has %d layers, model %d", trainer.ErrInvalidInput, len(l.Layers), c.NumHiddenLayers)
	}
	maxShard := o.MaxShardBytes
	if maxShard <= 0 {
		maxShard = DefaultMaxShardBytes
	}
	if err := checkOutDir(outDir, m.Dir()); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(filepath.Clean(outDir)), "."+filepath.Base(outDir)+".tmp*")
	if err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	if err := writeShards(tmp, mergedTensors(m, l), st, maxShard); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	if err := writeConfig(m.Dir(), tmp, dt); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	for _, f := range hfFiles {
		b, err := os.ReadFile(filepath.Join(m.Dir(), f))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("merge: %w", err)
		}
		if err := os.WriteFile(filepath.Join(tmp, f), b, 0o644); err != nil {
			return fmt.Errorf("merge: %w", err)
		}
	}
	// An empty outDir (checkOutDir allows one) gives way to the new one.
	if err := os.Remove(outDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("merge: %w", err)
	}
	if err := os.Rename(tmp, outDir); err != nil {
		return fmt.Errorf("merge: %w", err)
	}
	return nil
}

// checkOutDir refuses an outDir that holds anything, or that is the model's
// own directory (whose weights are mapped while the merge reads them).
func checkOutDir(outDir, modelDir string) error {
	a, _ := filepath.Abs(outDir)
	b, _ := filepath.Abs(modelDir)
	if a == b {
		return fmt.Errorf("%w: output directory %s is the base model's", trainer.ErrInvalidInput, outDir)
	}
	entries, err := os.ReadDir(outDir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case len(entries) > 0:
		return fmt.Errorf("%w: output directory %s is not empty", trainer.ErrInvalidInput, outDir)
	}
	return nil
}

func dtypeOfTorch(s string) DType {
	switch s {
	case "bfloat16":
		return BF16
	case "float16":
		return F16
	}
	return F32
}

var torchOf = map[DType]string{F32: "float32", F16: "float16", BF16: "bfloat16"}

// mergedTensors lists m's weights under their Hugging Face names, the
// adapted projections with l's update added when they are produced.
func mergedTensors(m *trainer.Model, l *trainer.LoRA) []hfTensor {
	c := m.Config()
	hid, V := c.HiddenSize, c.VocabSize
	hd, kvd := c.NumAttentionHeads*c.HeadDim, c.NumKeyValueHeads*c.HeadDim
	same := func(v []float32) func() []float32 { return func() []float32 { return v } }
	ts := []hfTensor{{"model.embed_tokens.weight", []int{V, hid}, same(m.Embed)}}
	for i := range m.Layers {
		ly := &m.Layers[i]
		p := fmt.Sprintf("model.layers.%d.", i)
		ts = append(ts, hfTensor{p + "input_layernorm.weight", []int{hid}, same(ly.AttnNorm)},
			hfTensor{p + "post_attention_layernorm.weight", []int{hid}, same(ly.MLPNorm)})
		for mod := trainer.Module(0); mod < trainer.NumModules; mod++ {
			sub := "self_attn."
			if mod >= trainer.ModGate {
				sub = "mlp."
			}
			w := projection(m, i, mod)
			data := same(w)
			if l != nil && l.Layers[i][mod] != nil {
				pair, scale := l.Layers[i][mod], l.Scale()
				data = func() []float32 { return addLowRank(w, pair, scale) }
			}
			in, out := c.Dims(mod)
			ts = append(ts, hfTensor{p + sub + mod.String() + ".weight", []int{out, in}, data})
		}
		if ly.BQKV != nil {
			ts = append(ts, hfTensor{p + "self_attn.q_proj.bias", []int{hd}, same(ly.BQKV[:hd])},
				hfTensor{p + "self_attn.k_proj.bias", []int{kvd}, same(ly.BQKV[hd : hd+kvd])},
				hfTensor{p + "self_attn.v_proj.bias", []int{kvd}, same(ly.BQKV[hd+kvd:])})
		}
		if ly.QNorm != nil {
			ts = append(ts, hfTensor{p + "self_attn.q_norm.weight", []int{c.HeadDim}, same(ly.QNorm)},
				hfTensor{p + "self_attn.k_norm.weight", []int{c.HeadDim}, same(ly.KNorm)})
		}
	}
	ts = append(ts, hfTensor{"model.norm.weight", []int{hid}, same(m.Norm)})
	if !c.TieWordEmbeddings {
		ts = append(ts, hfTensor{"lm_head.weight", []int{V, hid}, same(m.LMHead)})
	}
	return ts
}

// addLowRank returns w + scale·B·A as a new [Out, In] matrix: row o gains
// Σ_k (scale·B[o,k])·A[k,:], accumulated in float32.
func addLowRank(w []float32, p *trainer.LoRAPair, scale float32) []float32 {
	r := len(p.A) / p.In
	out := make([]float32, len(w))
	copy(out, w)
	for o := 0; o < p.Out; o++ {
		row := out[o*p.In : (o+1)*p.In]
		for k := 0; k < r; k++ {
			b := scale * p.B[o*r+k]
			if b == 0 {
				continue
			}
			a := p.A[k*p.In : (k+1)*p.In]
			for i, x := range a {
				row[i] += b * x
			}
		}
	}
	return out
}

// writeShards writes ts into dir as model.safetensors, or as
// model-0000i-of-0000n.safetensors shards of at most maxBytes each (a
// tensor larger than that gets a shard of its own) and the index
// transformers reads. Only one shard's tensors are produced at a time.
func writeShards(dir string, ts []hfTensor, dt safetensors.DType, maxBytes int64) error {
	var shards [][]hfTensor
	var size, total int64
	for _, t := range ts {
		b := t.elements() * dt.Size()
		if len(shards) == 0 || (size+b > maxBytes && size > 0) {
			shards = append(shards, nil)
			size = 0
		}
		shards[len(shards)-1] = append(shards[len(shards)-1], t)
		size += b
		total += b
	}
	weightMap := map[string]string{}
	for i, shard := range shards {
		name := "model.safetensors"
		if len(shards) > 1 {
			name = fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards))
		}
		out := make([]safetensors.Tensor, len(shard))
		for j, t := range shard {
			out[j] = safetensors.Tensor{Name: t.name, Shape: t.shape, Data: t.data(), DType: dt}
			weightMap[t.name] = name
		}
		if err := safetensors.WriteFile(filepath.Join(dir, name), out, map[string]string{"format": "pt"}); err != nil {
			return err
		}
	}
	if len(shards) == 1 {
		return nil
	}
	idx := struct {
		Metadata  map[string]int64  `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}{map[string]int64{"total_size": total}, weightMap}
	raw, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), append(raw, '\n'), 0o644)
}

// writeConfig copies config.json from src to dst with its dtype fields
// (torch_dtype, and transformers 5's dtype) set to dt; every other field
// is kept as written.
func writeConfig(src, dst string, dt DType) error {
	raw, err := os.ReadFile(filepath.Join(src, "config.json"))
	if err != nil {
		return err
	}
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return fmt.Errorf("%w: config.json: %v", trainer.ErrInvalidInput, err)
	}
	name, _ := json.Marshal(torchOf[dt])
	cfg["torch_dtype"] = name
	if _, ok := cfg["dtype"]; ok {
		cfg["dtype"] = name
	}
	out, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dst, "config.json"), append(out, '\n'), 0o644)
}
