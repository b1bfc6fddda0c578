package export

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// writeSafetensors writes one safetensors file of tensors that all have
// the same dtype. F32 and BF16 go through trainer/safetensors' writer; F16,
// which that writer does not write yet, through writeF16, which lays the
// file out the same way (tensors sorted by name, format "pt", the data
// section 8-byte aligned) and goes once the shared writer takes F16.
func writeSafetensors(path string, ts []safetensors.Tensor) error {
	meta := map[string]string{"format": "pt"}
	if len(ts) == 0 || ts[0].DType != safetensors.F16 {
		return safetensors.WriteFile(path, ts, meta)
	}
	return writeF16(path, ts, meta)
}

func writeF16(path string, ts []safetensors.Tensor, meta map[string]string) (err error) {
	sorted := append([]safetensors.Tensor(nil), ts...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	header := map[string]any{"__metadata__": meta}
	var off int64
	for _, t := range sorted {
		n := 1
		for _, d := range t.Shape {
			n *= d
		}
		if n != len(t.Data) || t.DType != safetensors.F16 {
			return fmt.Errorf("write safetensors %s: tensor %q: %w: shape %v, %d values of %s", path, t.Name, safetensors.ErrInvalid, t.Shape, len(t.Data), t.DType)
		}
		header[t.Name] = map[string]any{"dtype": safetensors.F16, "shape": t.Shape, "data_offsets": []int64{off, off + 2*int64(n)}}
		off += 2 * int64(n)
	}
	hb, err := json.Marshal(header)
	if err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	for (8+len(hb))%8 != 0 {
		hb = append(hb, ' ')
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	w := bufio.NewWriterSize(tmp, 1<<20)
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(len(hb)))
	w.Write(b[:])
	w.Write(hb)
	for _, t := range sorted {
		for _, v := range t.Data {
			binary.LittleEndian.PutUint16(b[:2], float32ToHalf(v))
			w.Write(b[:2])
		}
	}
	// bufio.Writer keeps its first error; Flush reports it.
	if err = w.Flush(); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	if err = tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	return nil
}
