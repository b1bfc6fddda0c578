package export

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/signal-p2p/signal/trainer/safetensors"
)

// The tests' GGUF reader: it checks what the writer wrote, independently of
// the writer's code, and is fuzzed so malformed input fails cleanly.

var errBadGGUF = errors.New("bad gguf")

type readTensor struct {
	name   string
	dims   []int
	typ    ggmlType
	offset int64
	data   []byte
}

type readFile struct {
	version uint32
	kv      map[string]any
	keys    []string
	tensors []readTensor
}

func (f *readFile) tensor(name string) (readTensor, bool) {
	for _, t := range f.tensors {
		if t.name == name {
			return t, true
		}
	}
	return readTensor{}, false
}

type ggufReader struct {
	b   []byte
	off int
}

func (r *ggufReader) take(n uint64) ([]byte, error) {
	if n > uint64(len(r.b)-r.off) {
		return nil, fmt.Errorf("%w: %d bytes wanted at %d of %d", errBadGGUF, n, r.off, len(r.b))
	}
	s := r.b[r.off : r.off+int(n)]
	r.off += int(n)
	return s, nil
}

func (r *ggufReader) u32() (uint32, error) {
	b, err := r.take(4)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

func (r *ggufReader) u64() (uint64, error) {
	b, err := r.take(8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

func (r *ggufReader) str() (string, error) {
	n, err := r.u64()
	if err != nil {
		return "", err
	}
	b, err := r.take(n)
	return string(b), err
}

func (r *ggufReader) value(t ggufValueType, depth int) (any, error) {
	fixed := map[ggufValueType]uint64{ggufUint8: 1, ggufInt8: 1, ggufBool: 1, ggufUint16: 2, ggufInt16: 2,
		ggufUint32: 4, ggufInt32: 4, ggufFloat32: 4, ggufUint64: 8, ggufInt64: 8, ggufFloat64: 8}
	if n, ok := fixed[t]; ok {
		b, err := r.take(n)
		if err != nil {
			return nil, err
		}
		switch t {
		case ggufBool:
			if b[0] > 1 {
				return nil, fmt.Errorf("%w: bool %d", errBadGGUF, b[0])
			}
			return b[0] == 1, nil
		case ggufUint32:
			return binary.LittleEndian.Uint32(b), nil
		case ggufInt32:
			return int32(binary.LittleEndian.Uint32(b)), nil
		case ggufFloat32:
			return math.Float32frombits(binary.LittleEndian.Uint32(b)), nil
		case ggufUint64:
			return binary.LittleEndian.Uint64(b), nil
		default:
			return b, nil
		}
	}
	switch t {
	case ggufString:
		return r.str()
	case ggufArray:
		if depth > 4 {
			return nil, fmt.Errorf("%w: arrays nested too deep", errBadGGUF)
		}
		et, err := r.u32()
		if err != nil {
			return nil, err
		}
		n, err := r.u64()
		if err != nil {
			return nil, err
		}
		if n > uint64(len(r.b)-r.off) { // every element takes at least a byte
			return nil, fmt.Errorf("%w: array of %d", errBadGGUF, n)
		}
		out := make([]any, 0, n)
		for i := uint64(0); i < n; i++ {
			v, err := r.value(ggufValueType(et), depth+1)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w: value type %d", errBadGGUF, t)
}

// readGGUF parses a whole GGUF file held in b.
func readGGUF(b []byte) (*readFile, error) {
	r := &ggufReader{b: b}
	magic, err := r.take(4)
	if err != nil {
		return nil, err
	}
	if string(magic) != ggufMagic {
		return nil, fmt.Errorf("%w: magic %q", errBadGGUF, magic)
	}
	f := &readFile{kv: map[string]any{}}
	if f.version, err = r.u32(); err != nil {
		return nil, err
	}
	if f.version != 3 {
		return nil, fmt.Errorf("%w: version %d", errBadGGUF, f.version)
	}
	nt, err := r.u64()
	if err != nil {
		return nil, err
	}
	nkv, err := r.u64()
	if err != nil {
		return nil, err
	}
	if nt > uint64(len(b)) || nkv > uint64(len(b)) {
		return nil, fmt.Errorf("%w: %d tensors, %d keys", errBadGGUF, nt, nkv)
	}
	for i := uint64(0); i < nkv; i++ {
		k, err := r.str()
		if err != nil {
			return nil, err
		}
		t, err := r.u32()
		if err != nil {
			return nil, err
		}
		v, err := r.value(ggufValueType(t), 0)
		if err != nil {
			return nil, fmt.Errorf("key %q: %w", k, err)
		}
		if _, dup := f.kv[k]; dup {
			return nil, fmt.Errorf("%w: duplicate key %q", errBadGGUF, k)
		}
		f.kv[k] = v
		f.keys = append(f.keys, k)
	}
	for i := uint64(0); i < nt; i++ {
		var t readTensor
		if t.name, err = r.str(); err != nil {
			return nil, err
		}
		nd, err := r.u32()
		if err != nil {
			return nil, err
		}
		if nd == 0 || nd > 4 {
			return nil, fmt.Errorf("%w: tensor %q has %d dims", errBadGGUF, t.name, nd)
		}
		for j := uint32(0); j < nd; j++ {
			d, err := r.u64()
			if err != nil {
				return nil, err
			}
			if d == 0 || d > 1<<32 {
				return nil, fmt.Errorf("%w: tensor %q dim %d", errBadGGUF, t.name, d)
			}
			t.dims = append(t.dims, int(d))
		}
		typ, err := r.u32()
		if err != nil {
			return nil, err
		}
		t.typ = ggmlType(typ)
		off, err := r.u64()
		if err != nil {
			return nil, err
		}
		if off%ggufAlignment != 0 || off > uint64(len(b)) {
			return nil, fmt.Errorf("%w: tensor %q offset %d", errBadGGUF, t.name, off)
		}
		t.offset = int64(off)
		f.tensors = append(f.tensors, t)
	}
	data := alignUp(int64(r.off), ggufAlignment)
	for i := range f.tensors {
		t := &f.tensors[i]
		n := 1
		for _, d := range t.dims {
			if n > math.MaxInt32/d {
				return nil, fmt.Errorf("%w: tensor %q too large", errBadGGUF, t.name)
			}
			n *= d
		}
		if t.typ == ggmlQ8_0 && t.dims[0]%q8Block != 0 {
			return nil, fmt.Errorf("%w: Q8_0 tensor %q row of %d", errBadGGUF, t.name, t.dims[0])
		}
		size := t.typ.dataBytes(n)
		if size == 0 {
			return nil, fmt.Errorf("%w: tensor %q type %v", errBadGGUF, t.name, t.typ)
		}
		start := data + t.offset
		if start+size > int64(len(b)) {
			return nil, fmt.Errorf("%w: tensor %q runs past the end", errBadGGUF, t.name)
		}
		t.data = b[start : start+size]
	}
	return f, nil
}

// decode returns a tensor's values as float32 (Q8_0 dequantized).
func (t readTensor) decode() []float32 {
	var out []float32
	switch t.typ {
	case ggmlF32:
		for i := 0; i < len(t.data); i += 4 {
			out = append(out, math.Float32frombits(binary.LittleEndian.Uint32(t.data[i:])))
		}
	case ggmlF16:
		for i := 0; i < len(t.data); i += 2 {
			out = append(out, safetensors.HalfToFloat32(binary.LittleEndian.Uint16(t.data[i:])))
		}
	case ggmlBF16:
		for i := 0; i < len(t.data); i += 2 {
			out = append(out, math.Float32frombits(uint32(binary.LittleEndian.Uint16(t.data[i:]))<<16))
		}
	case ggmlQ8_0:
		for i := 0; i < len(t.data); i += q8BlockBytes {
			d := safetensors.HalfToFloat32(binary.LittleEndian.Uint16(t.data[i:]))
			for _, q := range t.data[i+2 : i+q8BlockBytes] {
				out = append(out, float32(int8(q))*d)
			}
		}
	}
	return out
}

// FuzzReadGGUF feeds the reader mutations of a real file: it must return
// an error or a file, never panic or allocate without bound.
func FuzzReadGGUF(f *testing.F) {
	var buf bytes.Buffer
	g := sampleGGUF()
	if err := g.write(&buf); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add([]byte("GGUF\x03\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		rf, err := readGGUF(b)
		if err != nil {
			return
		}
		for _, tn := range rf.tensors {
			_ = tn.decode()
		}
	})
}
