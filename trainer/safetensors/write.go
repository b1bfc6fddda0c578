package safetensors

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
)

// Tensor is one tensor to write. Data holds f32 values in row-major order;
// it is stored as DType (F32 when empty, or BF16 or F16 rounded to nearest
// even).
type Tensor struct {
	Name  string
	Shape []int
	Data  []float32
	DType DType
}

// WriteFile writes tensors (sorted by name) and metadata to path atomically:
// a temporary file in the same directory is renamed over path once complete.
func WriteFile(path string, tensors []Tensor, metadata map[string]string) (err error) {
	sorted := append([]Tensor(nil), tensors...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	header := map[string]any{}
	if len(metadata) > 0 {
		header["__metadata__"] = metadata
	}
	var off int64
	for i, t := range sorted {
		if t.DType == "" {
			sorted[i].DType = F32
			t.DType = F32
		}
		if t.DType != F32 && t.DType != BF16 && t.DType != F16 {
			return fmt.Errorf("write safetensors %s: tensor %q: %w: can write F32, BF16 or F16, not %s", path, t.Name, ErrUnsupported, t.DType)
		}
		if _, dup := header[t.Name]; dup || t.Name == "__metadata__" || t.Name == "" {
			return fmt.Errorf("write safetensors %s: %w: duplicate or reserved tensor name %q", path, ErrInvalid, t.Name)
		}
		n := 1
		for _, d := range t.Shape {
			if d < 0 {
				return fmt.Errorf("write safetensors %s: tensor %q: %w: negative dimension in %v", path, t.Name, ErrInvalid, t.Shape)
			}
			n *= d
		}
		if n != len(t.Data) {
			return fmt.Errorf("write safetensors %s: tensor %q: %w: shape %v needs %d values, have %d", path, t.Name, ErrInvalid, t.Shape, n, len(t.Data))
		}
		shape := t.Shape
		if shape == nil {
			shape = []int{}
		}
		size := int64(n) * t.DType.Size()
		header[t.Name] = map[string]any{"dtype": t.DType, "shape": shape, "data_offsets": []int64{off, off + size}}
		off += size
	}
	hb, err := json.Marshal(header)
	if err != nil {
		return fmt.Errorf("write safetensors %s: encode header: %w", path, err)
	}
	// Pad the header with spaces so the data section starts 8-byte aligned,
	// which lets readers view F32 tensors in place.
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
	var lenBuf [8]byte
	binary.LittleEndian.PutUint64(lenBuf[:], uint64(len(hb)))
	if _, err = w.Write(lenBuf[:]); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	if _, err = w.Write(hb); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	var b [4]byte
	for _, t := range sorted {
		for _, v := range t.Data {
			switch t.DType {
			case BF16:
				binary.LittleEndian.PutUint16(b[:2], Float32ToBF16(v))
				_, err = w.Write(b[:2])
			case F16:
				binary.LittleEndian.PutUint16(b[:2], Float32ToHalf(v))
				_, err = w.Write(b[:2])
			default:
				binary.LittleEndian.PutUint32(b[:], math.Float32bits(v))
				_, err = w.Write(b[:])
			}
			if err != nil {
				return fmt.Errorf("write safetensors %s: %w", path, err)
			}
		}
	}
	if err = w.Flush(); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("write safetensors %s: %w", path, err)
	}
	// CreateTemp makes the file 0600; model files are meant to be shared.
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
