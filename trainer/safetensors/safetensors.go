// Package safetensors reads and writes the Hugging Face safetensors format:
// an 8-byte little-endian header length N, N bytes of JSON describing each
// tensor (dtype, shape, byte range), then the tensors' bytes.
//
// Files are memory-mapped so that loading a model reads each page once, into
// the f32 buffers the engine keeps, instead of first copying the whole file
// into the Go heap. The header is validated strictly, as the reference Rust
// implementation does: every byte range must match its dtype and shape, lie
// inside the file, and the ranges must tile the data section without gaps or
// overlaps. A file that passes can be converted without further bounds checks.
package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"sort"
	"syscall"
	"unsafe"
)

// Errors callers can match with errors.Is.
var (
	// ErrInvalid marks a file or header that does not follow the format
	// (truncated, bad JSON, ranges that do not match shapes).
	ErrInvalid = errors.New("invalid safetensors")
	// ErrUnsupported marks a valid tensor whose dtype cannot be converted to f32.
	ErrUnsupported = errors.New("unsupported safetensors dtype")
	// ErrNotFound marks a tensor name absent from the file or index.
	ErrNotFound = errors.New("tensor not found")
)

// maxHeaderBytes bounds the JSON header so that a corrupt length cannot make
// the parser allocate gigabytes; the Rust implementation uses the same limit.
const maxHeaderBytes = 100 << 20

// DType is a safetensors element type name, e.g. "F32" or "BF16".
type DType string

// Element types of the format. Only F32, BF16 and F16 convert to f32; the
// others are recognised so that their byte ranges can still be validated.
const (
	F32  DType = "F32"
	BF16 DType = "BF16"
	F16  DType = "F16"
)

var dtypeSizes = map[DType]int64{
	"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
	"I16": 2, "U16": 2, "F16": 2, "BF16": 2,
	"I32": 4, "U32": 4, "F32": 4,
	"I64": 8, "U64": 8, "F64": 8,
}

// Size returns the byte size of one element, or 0 for an unknown dtype.
func (d DType) Size() int64 { return dtypeSizes[d] }

// TensorInfo describes one tensor of a file. Begin and End are byte offsets
// into the data section (after the header).
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int
	Begin int64
	End   int64
}

// NumElements returns the product of the shape (1 for a scalar).
func (t TensorInfo) NumElements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Header is a parsed and validated safetensors header.
type Header struct {
	Tensors  map[string]TensorInfo
	Metadata map[string]string
	// DataOffset is where the data section starts in the file (8 + N).
	DataOffset int64
}

// Names returns the tensor names in sorted order.
func (h *Header) Names() []string {
	names := make([]string, 0, len(h.Tensors))
	for n := range h.Tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

type rawTensor struct {
	DType       DType   `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// ParseHeader parses and validates the header at the start of buf, for a
// file of fileSize bytes (buf may hold just the header's bytes or the whole
// file). It never panics on malformed input.
func ParseHeader(buf []byte, fileSize int64) (*Header, error) {
	if len(buf) < 8 || fileSize < 8 {
		return nil, fmt.Errorf("%w: file of %d bytes is shorter than the 8-byte header length", ErrInvalid, fileSize)
	}
	n := binary.LittleEndian.Uint64(buf[:8])
	if n > maxHeaderBytes {
		return nil, fmt.Errorf("%w: header length %d exceeds the %d-byte limit", ErrInvalid, n, maxHeaderBytes)
	}
	if int64(n) > fileSize-8 || uint64(len(buf)-8) < n {
		return nil, fmt.Errorf("%w: header length %d runs past the end of a %d-byte file (truncated?)", ErrInvalid, n, fileSize)
	}
	if n < 2 {
		return nil, fmt.Errorf("%w: header length %d is too short for a JSON object", ErrInvalid, n)
	}
	hb := buf[8 : 8+n]
	if hb[0] != '{' {
		return nil, fmt.Errorf("%w: header does not start with '{'", ErrInvalid)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(hb, &raw); err != nil {
		return nil, fmt.Errorf("%w: header JSON: %v", ErrInvalid, err)
	}
	h := &Header{Tensors: make(map[string]TensorInfo, len(raw)), DataOffset: 8 + int64(n)}
	dataSize := fileSize - h.DataOffset
	for name, msg := range raw {
		if name == "__metadata__" {
			if err := json.Unmarshal(msg, &h.Metadata); err != nil {
				return nil, fmt.Errorf("%w: __metadata__ must map strings to strings: %v", ErrInvalid, err)
			}
			continue
		}
		var rt rawTensor
		if err := json.Unmarshal(msg, &rt); err != nil {
			return nil, fmt.Errorf("%w: tensor %q: %v", ErrInvalid, name, err)
		}
		size := rt.DType.Size()
		if size == 0 {
			return nil, fmt.Errorf("%w: tensor %q: unknown dtype %q", ErrInvalid, name, rt.DType)
		}
		if len(rt.DataOffsets) != 2 {
			return nil, fmt.Errorf("%w: tensor %q: data_offsets must have 2 entries, has %d", ErrInvalid, name, len(rt.DataOffsets))
		}
		begin, end := rt.DataOffsets[0], rt.DataOffsets[1]
		if begin < 0 || end < begin || end > dataSize {
			return nil, fmt.Errorf("%w: tensor %q: data_offsets [%d, %d] outside the %d-byte data section (truncated?)", ErrInvalid, name, begin, end, dataSize)
		}
		elems := int64(1)
		shape := make([]int, len(rt.Shape))
		for i, d := range rt.Shape {
			if d < 0 || (d > 0 && elems > (1<<48)/d) {
				return nil, fmt.Errorf("%w: tensor %q: bad dimension %d in shape %v", ErrInvalid, name, d, rt.Shape)
			}
			elems *= d
			shape[i] = int(d)
		}
		if elems*size != end-begin {
			return nil, fmt.Errorf("%w: tensor %q: shape %v of %s needs %d bytes, data_offsets give %d", ErrInvalid, name, rt.Shape, rt.DType, elems*size, end-begin)
		}
		h.Tensors[name] = TensorInfo{Name: name, DType: rt.DType, Shape: shape, Begin: begin, End: end}
	}
	// The ranges must tile the data section: sorted by begin, each starts
	// where the previous ended, and the last ends at the end of the file.
	infos := make([]TensorInfo, 0, len(h.Tensors))
	for _, t := range h.Tensors {
		infos = append(infos, t)
	}
	sort.Slice(infos, func(i, j int) bool {
		if infos[i].Begin != infos[j].Begin {
			return infos[i].Begin < infos[j].Begin
		}
		return infos[i].End < infos[j].End
	})
	var pos int64
	for _, t := range infos {
		if t.Begin != pos {
			return nil, fmt.Errorf("%w: tensor %q starts at byte %d, expected %d (gap or overlap)", ErrInvalid, t.Name, t.Begin, pos)
		}
		pos = t.End
	}
	if pos != dataSize {
		return nil, fmt.Errorf("%w: tensors end at byte %d of a %d-byte data section", ErrInvalid, pos, dataSize)
	}
	return h, nil
}

// File is an open, memory-mapped safetensors file. Slices returned by View
// alias the mapping and are valid until Close.
type File struct {
	Path string
	*Header
	data []byte // the whole file, mapped read-only
}

// Open maps path and validates its header.
func Open(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open safetensors %s: %w", path, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat safetensors %s: %w", path, err)
	}
	size := st.Size()
	if size < 8 {
		return nil, fmt.Errorf("load safetensors %s: %w: file of %d bytes is shorter than the 8-byte header length", path, ErrInvalid, size)
	}
	if int64(int(size)) != size {
		return nil, fmt.Errorf("load safetensors %s: %w: file too large to map", path, ErrInvalid)
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap safetensors %s: %w", path, err)
	}
	h, err := ParseHeader(data, size)
	if err != nil {
		_ = syscall.Munmap(data)
		return nil, fmt.Errorf("load safetensors %s: %w", path, err)
	}
	return &File{Path: path, Header: h, data: data}, nil
}

// Close unmaps the file; views obtained from it must not be used afterwards.
func (f *File) Close() error {
	if f.data == nil {
		return nil
	}
	err := syscall.Munmap(f.data)
	f.data = nil
	return err
}

// Bytes returns the raw bytes of a tensor (aliasing the mapping).
func (f *File) Bytes(name string) ([]byte, TensorInfo, error) {
	t, ok := f.Tensors[name]
	if !ok {
		return nil, TensorInfo{}, fmt.Errorf("%s: %w: %q", f.Path, ErrNotFound, name)
	}
	if f.data == nil {
		return nil, t, fmt.Errorf("%s: file is closed", f.Path)
	}
	off := f.DataOffset
	return f.data[off+t.Begin : off+t.End], t, nil
}

// View returns an F32 tensor as a []float32 aliasing the read-only mapping,
// without copying. ok is false when the tensor is not F32 or is misaligned;
// the caller then converts with ReadFloat32. Writing to a view faults.
func (f *File) View(name string) (v []float32, ok bool) {
	b, t, err := f.Bytes(name)
	if err != nil || t.DType != F32 || len(b) == 0 || uintptr(unsafe.Pointer(&b[0]))%4 != 0 {
		return nil, false
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4), true
}

// ReadFloat32 converts a tensor to f32 into dst, which must hold exactly
// NumElements values. F32, BF16 (exact) and F16 (exact) are supported.
func (f *File) ReadFloat32(name string, dst []float32) error {
	b, t, err := f.Bytes(name)
	if err != nil {
		return err
	}
	if n := t.NumElements(); len(dst) != n {
		return fmt.Errorf("%s: tensor %q has %d elements, destination holds %d", f.Path, name, n, len(dst))
	}
	if err := Convert(dst, b, t.DType); err != nil {
		return fmt.Errorf("%s: tensor %q: %w", f.Path, name, err)
	}
	return nil
}

// Float32 returns a newly allocated f32 copy of a tensor.
func (f *File) Float32(name string) ([]float32, TensorInfo, error) {
	t, ok := f.Tensors[name]
	if !ok {
		return nil, TensorInfo{}, fmt.Errorf("%s: %w: %q", f.Path, ErrNotFound, name)
	}
	dst := make([]float32, t.NumElements())
	return dst, t, f.ReadFloat32(name, dst)
}

// Convert decodes little-endian elements of dtype from src into dst
// (len(src) must be len(dst) times the element size).
func Convert(dst []float32, src []byte, dtype DType) error {
	if int64(len(src)) != int64(len(dst))*dtype.Size() {
		return fmt.Errorf("%w: %d bytes of %s for %d values", ErrInvalid, len(src), dtype, len(dst))
	}
	switch dtype {
	case F32:
		for i := range dst {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:]))
		}
	case BF16:
		// BF16 is the top half of an f32: the conversion is exact.
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(src[2*i:])) << 16)
		}
	case F16:
		for i := range dst {
			dst[i] = HalfToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
		}
	default:
		return fmt.Errorf("%w: %s (want F32, BF16 or F16)", ErrUnsupported, dtype)
	}
	return nil
}

// HalfToFloat32 converts an IEEE 754 binary16 value to f32 exactly.
func HalfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f: // inf or NaN
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	case mant == 0:
		return math.Float32frombits(sign)
	default: // subnormal half: normalise
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3ff
		return math.Float32frombits(sign | e<<23 | mant<<13)
	}
}

// Float32ToBF16 rounds an f32 to the nearest BF16 (ties to even), as
// PyTorch's .to(torch.bfloat16) does.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep it a quiet NaN
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// Float32ToHalf rounds an f32 to the nearest IEEE 754 binary16 (ties to
// even), as ggml's GGML_FP32_TO_FP16 and numpy's astype(float16) do:
// overflow becomes infinity, tiny values become subnormals or zero, NaN
// stays a quiet NaN.
func Float32ToHalf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	switch {
	case exp == 0xff: // inf or NaN
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp > 127+15: // beyond the largest finite half
		return sign | 0x7c00
	case exp >= 127-14: // a normal half, possibly rounding up to inf
		h := uint32(exp-127+15)<<10 | mant>>13
		rest := mant & 0x1fff
		if rest > 0x1000 || (rest == 0x1000 && h&1 == 1) {
			h++ // a carry into the exponent is the right result, inf included
		}
		return sign | uint16(h)
	case exp >= 127-25: // a subnormal half (or the smallest rounding to one)
		m := mant | 0x800000 // the implicit bit
		shift := uint32(127 - 14 - exp + 13)
		h := m >> shift
		rest := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rest > half || (rest == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	default:
		return sign
	}
}
