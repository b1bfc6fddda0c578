// Package fingerprint finds what a node can offer: GPUs through NVML
// (github.com/NVIDIA/go-nvml, which dlopens libnvidia-ml at run time), or
// CPU cores and memory when NVML is absent. It follows the shape of nomad's
// device plugins: Fingerprint(ctx) returns a channel that carries a first
// result at once and then every change, until ctx ends.
package fingerprint

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/signal-p2p/signal/protocol"
)

// Source names.
const (
	SourceNVML = "nvml"
	SourceCPU  = "cpu"
)

// ErrNoNVML means the NVML library could not be loaded or found no GPU.
var ErrNoNVML = errors.New("nvml unavailable")

// Devices is one reading of a machine's capacity.
type Devices struct {
	GPUs []protocol.GPU
	CPU  protocol.CPU
}

// Result is what the fingerprinter emits: the devices and which source
// read them, or the error of a failed reading (the previous devices stand).
type Result struct {
	Source  string
	Devices Devices
	Err     error
}

// Source reads devices; the NVML source and test fakes implement it.
type Source interface {
	Name() string
	Probe(ctx context.Context) (Devices, error)
}

// Fingerprinter polls a Source and reports changes.
type Fingerprinter struct {
	src      Source
	interval time.Duration
}

// DefaultInterval is how often devices are re-read.
const DefaultInterval = 5 * time.Second

// New returns a fingerprinter over src, polling every interval (≤0: DefaultInterval).
func New(src Source, interval time.Duration) *Fingerprinter {
	if interval <= 0 {
		interval = DefaultInterval
	}
	return &Fingerprinter{src: src, interval: interval}
}

// Detect returns a fingerprinter over NVML when it loads and sees at least
// one GPU, else over the CPU, and the reason NVML was not used (nil when it is).
func Detect(interval time.Duration) (*Fingerprinter, error) {
	src, err := OpenNVML()
	if err != nil {
		return New(CPUSource{}, interval), err
	}
	return New(src, interval), nil
}

// Source returns the fingerprinter's source name.
func (f *Fingerprinter) Source() string { return f.src.Name() }

// Fingerprint starts polling; the channel is closed when ctx ends. A reading
// equal to the last one sent is not sent again.
func (f *Fingerprinter) Fingerprint(ctx context.Context) <-chan Result {
	out := make(chan Result, 1)
	go func() {
		defer close(out)
		var last *Result
		t := time.NewTicker(f.interval)
		defer t.Stop()
		for {
			d, err := f.src.Probe(ctx)
			r := Result{Source: f.src.Name(), Devices: d, Err: err}
			if last == nil || !reflect.DeepEqual(*last, r) {
				select {
				case out <- r:
					last = &r
				case <-ctx.Done():
					return
				}
			}
			select {
			case <-t.C:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// CPUSource reports CPU cores and memory: the fallback without NVML.
type CPUSource struct{}

// Name is SourceCPU.
func (CPUSource) Name() string { return SourceCPU }

// Probe reads the core count and /proc/meminfo's MemTotal.
func (CPUSource) Probe(context.Context) (Devices, error) {
	mem, err := memTotalBytes("/proc/meminfo")
	return Devices{CPU: protocol.CPU{Cores: runtime.NumCPU(), MemoryTotal: mem}}, err
}

// memTotalBytes parses the MemTotal line of a meminfo file.
func memTotalBytes(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("read memory size: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse %s MemTotal %q: %w", path, fields[1], err)
			}
			return kb * 1024, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	return 0, fmt.Errorf("no MemTotal in %s", path)
}
