package export

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"

	"github.com/signal-p2p/signal/trainer"
	"github.com/signal-p2p/signal/trainer/safetensors"
)

// GGUF (version 3) is ggml's single-file model format: a header, typed
// key/value metadata, a table of tensor descriptions, then the tensors'
// bytes, each at an offset aligned to ggufAlignment. Everything is
// little-endian; strings are a uint64 byte length and the bytes, no NUL.
// Tensor dimensions are listed innermost first (ggml's ne[0] is the number
// of columns), so a Hugging Face [out, in] matrix is written as [in, out]
// with its bytes unchanged.
const (
	ggufMagic     = "GGUF"
	ggufVersion   = 3
	ggufAlignment = 32 // general.alignment's default; this writer never changes it
)

// ggufValueType is the type tag of a metadata value.
type ggufValueType uint32

const (
	ggufUint8   ggufValueType = 0
	ggufInt8    ggufValueType = 1
	ggufUint16  ggufValueType = 2
	ggufInt16   ggufValueType = 3
	ggufUint32  ggufValueType = 4
	ggufInt32   ggufValueType = 5
	ggufFloat32 ggufValueType = 6
	ggufBool    ggufValueType = 7
	ggufString  ggufValueType = 8
	ggufArray   ggufValueType = 9
	ggufUint64  ggufValueType = 10
	ggufInt64   ggufValueType = 11
	ggufFloat64 ggufValueType = 12
)

// ggmlType is a tensor element type, numbered as in ggml.h.
type ggmlType uint32

const (
	ggmlF32  ggmlType = 0
	ggmlF16  ggmlType = 1
	ggmlQ8_0 ggmlType = 8
	ggmlBF16 ggmlType = 30
)

// q8Block is the number of values of one Q8_0 block, which is stored as an
// f16 scale and 32 int8s.
const (
	q8Block      = 32
	q8BlockBytes = 2 + q8Block
)

// dataBytes is the size of n elements of t.
func (t ggmlType) dataBytes(n int) int64 {
	switch t {
	case ggmlF32:
		return 4 * int64(n)
	case ggmlF16, ggmlBF16:
		return 2 * int64(n)
	case ggmlQ8_0:
		return int64(n/q8Block) * q8BlockBytes
	}
	return 0
}

func (t ggmlType) String() string {
	switch t {
	case ggmlF32:
		return "F32"
	case ggmlF16:
		return "F16"
	case ggmlQ8_0:
		return "Q8_0"
	case ggmlBF16:
		return "BF16"
	}
	return fmt.Sprintf("ggml type %d", uint32(t))
}

// ggufKV is one metadata entry. val is string, bool, uint32, int32,
// float32, uint64, []string, []int32 or []float32.
type ggufKV struct {
	key string
	val any
}

// ggufTensor is one tensor to write. Its values are produced when the file
// is written, one tensor at a time, so a file larger than memory can be
// written from a model that is mapped or loaded once.
type ggufTensor struct {
	name string
	dims []int // ne order: innermost (columns) first
	typ  ggmlType
	data func() ([]float32, error)
}

func (t ggufTensor) numElements() int {
	n := 1
	for _, d := range t.dims {
		n *= d
	}
	return n
}

// ggufFile is a GGUF file being assembled: metadata in insertion order
// (llama.cpp does not care, but readers print it so) and tensors in the
// order written.
type ggufFile struct {
	kvs     []ggufKV
	tensors []ggufTensor
}

func (g *ggufFile) set(key string, val any) { g.kvs = append(g.kvs, ggufKV{key, val}) }

func (g *ggufFile) addTensor(name string, typ ggmlType, data func() ([]float32, error), hfShape ...int) {
	dims := make([]int, len(hfShape))
	for i, d := range hfShape {
		dims[len(hfShape)-1-i] = d
	}
	g.tensors = append(g.tensors, ggufTensor{name: name, dims: dims, typ: typ, data: data})
}

// writeFile writes the file to path atomically: a temporary file in the
// same directory is renamed over path once complete and synced.
func (g *ggufFile) writeFile(path string) (err error) {
	for _, t := range g.tensors {
		if t.typ == ggmlQ8_0 && t.dims[0]%q8Block != 0 {
			return fmt.Errorf("write gguf %s: tensor %s: %w: Q8_0 needs rows of a multiple of %d values, not %d", path, t.name, trainer.ErrUnsupported, q8Block, t.dims[0])
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	w := bufio.NewWriterSize(tmp, 1<<20)
	if err = g.write(w); err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	if err = w.Flush(); err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	// CreateTemp makes the file 0600; model files are meant to be shared.
	if err = tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write gguf %s: %w", path, err)
	}
	return nil
}

// write streams the whole file to w.
func (g *ggufFile) write(w io.Writer) error {
	e := &ggufEncoder{w: w}
	e.raw([]byte(ggufMagic))
	e.u32(ggufVersion)
	e.u64(uint64(len(g.tensors)))
	e.u64(uint64(len(g.kvs)))
	for _, kv := range g.kvs {
		e.str(kv.key)
		if err := e.value(kv.val); err != nil {
			return fmt.Errorf("metadata %s: %w", kv.key, err)
		}
	}
	var off int64
	for _, t := range g.tensors {
		e.str(t.name)
		e.u32(uint32(len(t.dims)))
		for _, d := range t.dims {
			e.u64(uint64(d))
		}
		e.u32(uint32(t.typ))
		e.u64(uint64(off))
		off = alignUp(off+t.typ.dataBytes(t.numElements()), ggufAlignment)
	}
	e.pad()
	for _, t := range g.tensors {
		vals, err := t.data()
		if err != nil {
			return fmt.Errorf("tensor %s: %w", t.name, err)
		}
		if len(vals) != t.numElements() {
			return fmt.Errorf("tensor %s: %d values for dims %v", t.name, len(vals), t.dims)
		}
		e.tensor(t.typ, vals, t.dims[0])
		e.pad()
	}
	return e.err
}

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// ggufEncoder writes GGUF's primitives, keeping the first error (as
// bufio.Writer does) so the layout code reads straight through.
type ggufEncoder struct {
	w   io.Writer
	n   int64
	err error
	buf [8]byte
}

func (e *ggufEncoder) raw(b []byte) {
	if e.err != nil {
		return
	}
	n, err := e.w.Write(b)
	e.n += int64(n)
	e.err = err
}

func (e *ggufEncoder) u32(v uint32) {
	binary.LittleEndian.PutUint32(e.buf[:4], v)
	e.raw(e.buf[:4])
}

func (e *ggufEncoder) u64(v uint64) {
	binary.LittleEndian.PutUint64(e.buf[:8], v)
	e.raw(e.buf[:8])
}

func (e *ggufEncoder) str(s string) {
	e.u64(uint64(len(s)))
	e.raw([]byte(s))
}

func (e *ggufEncoder) pad() {
	var zeros [ggufAlignment]byte
	if r := e.n % ggufAlignment; r != 0 {
		e.raw(zeros[:ggufAlignment-r])
	}
}

func (e *ggufEncoder) value(v any) error {
	switch v := v.(type) {
	case string:
		e.u32(uint32(ggufString))
		e.str(v)
	case bool:
		e.u32(uint32(ggufBool))
		b := byte(0)
		if v {
			b = 1
		}
		e.raw([]byte{b})
	case uint32:
		e.u32(uint32(ggufUint32))
		e.u32(v)
	case int32:
		e.u32(uint32(ggufInt32))
		e.u32(uint32(v))
	case uint64:
		e.u32(uint32(ggufUint64))
		e.u64(v)
	case float32:
		e.u32(uint32(ggufFloat32))
		e.u32(math.Float32bits(v))
	case []string:
		e.u32(uint32(ggufArray))
		e.u32(uint32(ggufString))
		e.u64(uint64(len(v)))
		for _, s := range v {
			e.str(s)
		}
	case []int32:
		e.u32(uint32(ggufArray))
		e.u32(uint32(ggufInt32))
		e.u64(uint64(len(v)))
		for _, x := range v {
			e.u32(uint32(x))
		}
	case []uint32:
		e.u32(uint32(ggufArray))
		e.u32(uint32(ggufUint32))
		e.u64(uint64(len(v)))
		for _, x := range v {
			e.u32(x)
		}
	case []float32:
		e.u32(uint32(ggufArray))
		e.u32(uint32(ggufFloat32))
		e.u64(uint64(len(v)))
		for _, x := range v {
			e.u32(math.Float32bits(x))
		}
	default:
		return fmt.Errorf("no GGUF type for a %T", v)
	}
	return nil
}

// tensor writes vals (rows of cols values) as typ.
func (e *ggufEncoder) tensor(typ ggmlType, vals []float32, cols int) {
	const chunk = 1 << 14
	buf := make([]byte, 0, chunk*4)
	flush := func() {
		e.raw(buf)
		buf = buf[:0]
	}
	switch typ {
	case ggmlF32:
		for _, v := range vals {
			buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(v))
			if len(buf) == cap(buf) {
				flush()
			}
		}
	case ggmlF16:
		for _, v := range vals {
			buf = binary.LittleEndian.AppendUint16(buf, safetensors.Float32ToHalf(v))
			if len(buf)+2 > cap(buf) {
				flush()
			}
		}
	case ggmlBF16:
		for _, v := range vals {
			buf = binary.LittleEndian.AppendUint16(buf, safetensors.Float32ToBF16(v))
			if len(buf)+2 > cap(buf) {
				flush()
			}
		}
	case ggmlQ8_0:
		var blk [q8BlockBytes]byte
		for i := 0; i < len(vals); i += q8Block {
			quantizeQ8_0(blk[:], vals[i:i+q8Block])
			buf = append(buf, blk[:]...)
			if len(buf)+q8BlockBytes > cap(buf) {
				flush()
			}
		}
	}
	flush()
}

// quantizeQ8_0 writes one Q8_0 block of 32 values into dst (34 bytes) as
// ggml's reference quantize_row_q8_0_ref does, operation for operation in
// float32 so the bytes are the same: d = max|x|/127 stored as f16, and
// each q = round-half-away-from-zero(x · (1/d)).
func quantizeQ8_0(dst []byte, x []float32) {
	var amax float32
	for _, v := range x {
		if a := float32(math.Abs(float64(v))); a > amax {
			amax = a
		}
	}
	d := amax / 127
	var id float32
	if d != 0 {
		id = 1 / d
	}
	binary.LittleEndian.PutUint16(dst[:2], safetensors.Float32ToHalf(d))
	for j, v := range x {
		p := v * id
		dst[2+j] = byte(int8(math.Round(float64(p))))
	}
}
