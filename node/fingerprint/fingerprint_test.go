package fingerprint

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/signal-p2p/signal/protocol"
)

// fakeGPU is an NVML device with fixed readings.
type fakeGPU struct {
	name, uuid  string
	total, free uint64
	util        uint32
	major       int
	noUtil      bool
}

var _ NVMLDevice = (*fakeGPU)(nil)

func (g *fakeGPU) GetName() (string, nvml.Return) { return g.name, nvml.SUCCESS }
func (g *fakeGPU) GetUUID() (string, nvml.Return) { return g.uuid, nvml.SUCCESS }
func (g *fakeGPU) GetMemoryInfo() (nvml.Memory, nvml.Return) {
	return nvml.Memory{Total: g.total, Free: g.free, Used: g.total - g.free}, nvml.SUCCESS
}
func (g *fakeGPU) GetUtilizationRates() (nvml.Utilization, nvml.Return) {
	if g.noUtil {
		return nvml.Utilization{}, nvml.ERROR_NOT_SUPPORTED
	}
	return nvml.Utilization{Gpu: g.util}, nvml.SUCCESS
}
func (g *fakeGPU) GetCudaComputeCapability() (int, int, nvml.Return) { return g.major, 0, nvml.SUCCESS }

func TestNVMLSourceReadsDevices(t *testing.T) {
	devs := []NVMLDevice{
		&fakeGPU{name: "NVIDIA H200", uuid: "GPU-1", total: 141 << 30, free: 140 << 30, util: 37, major: 9},
		&fakeGPU{name: "NVIDIA H200", uuid: "GPU-2", total: 141 << 30, free: 10 << 30, major: 9, noUtil: true},
	}
	src := NewNVMLSource(func() ([]NVMLDevice, error) { return devs, nil })
	d, err := src.Probe(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []protocol.GPU{
		{Name: "NVIDIA H200", UUID: "GPU-1", MemoryTotal: 141 << 30, MemoryFree: 140 << 30, Utilization: 0.37, ComputeCapability: "9.0"},
		{Name: "NVIDIA H200", UUID: "GPU-2", MemoryTotal: 141 << 30, MemoryFree: 10 << 30, ComputeCapability: "9.0"},
	}
	if len(d.GPUs) != 2 || d.GPUs[0] != want[0] || d.GPUs[1] != want[1] {
		t.Fatalf("GPUs = %+v, want %+v", d.GPUs, want)
	}
	if d.CPU.Cores <= 0 {
		t.Fatalf("CPU cores = %d", d.CPU.Cores)
	}
	boom := errors.New("device lost")
	src = NewNVMLSource(func() ([]NVMLDevice, error) { return nil, boom })
	if _, err := src.Probe(context.Background()); !errors.Is(err, boom) {
		t.Fatalf("Probe err = %v", err)
	}
}

// seqSource returns scripted readings, then repeats the last one.
type seqSource struct {
	mu    sync.Mutex
	reads []Devices
	calls int
}

func (s *seqSource) Name() string { return "seq" }
func (s *seqSource) Probe(context.Context) (Devices, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := min(s.calls, len(s.reads)-1)
	s.calls++
	return s.reads[i], nil
}

func TestFingerprintEmitsChangesOnly(t *testing.T) {
	a := Devices{CPU: protocol.CPU{Cores: 2}}
	b := Devices{GPUs: []protocol.GPU{{UUID: "GPU-1", MemoryFree: 5}}, CPU: protocol.CPU{Cores: 2}}
	src := &seqSource{reads: []Devices{a, a, a, b, b, b}}
	ctx, cancel := context.WithCancel(context.Background())
	ch := New(src, time.Millisecond).Fingerprint(ctx)
	first := <-ch
	second := <-ch
	if first.Source != "seq" || len(first.Devices.GPUs) != 0 || len(second.Devices.GPUs) != 1 {
		t.Fatalf("results = %+v then %+v", first, second)
	}
	select {
	case r := <-ch:
		t.Fatalf("unchanged reading re-sent: %+v", r)
	case <-time.After(50 * time.Millisecond):
	}
	cancel()
	for range ch { // must close once ctx ends
	}
}

func TestCPUFallback(t *testing.T) {
	d, err := CPUSource{}.Probe(context.Background())
	if err != nil {
		t.Skipf("no /proc/meminfo here: %v", err)
	}
	if d.CPU.Cores <= 0 || d.CPU.MemoryTotal <= 0 || len(d.GPUs) != 0 {
		t.Fatalf("CPU devices = %+v", d)
	}
	f := filepath.Join(t.TempDir(), "meminfo")
	if err := os.WriteFile(f, []byte("MemFree: 1 kB\nMemTotal:  2048 kB\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if n, err := memTotalBytes(f); err != nil || n != 2048*1024 {
		t.Fatalf("memTotalBytes = %d, %v", n, err)
	}
	if err := os.WriteFile(f, []byte("MemTotal: lots kB\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := memTotalBytes(f); err == nil {
		t.Fatal("bad MemTotal accepted")
	}
}

func TestDetectWithoutNVML(t *testing.T) {
	f, err := Detect(time.Second)
	if err == nil {
		t.Logf("NVML present: source %s", f.Source())
		return
	}
	if !errors.Is(err, ErrNoNVML) || f.Source() != SourceCPU {
		t.Fatalf("Detect = %s, %v; want cpu fallback with ErrNoNVML", f.Source(), err)
	}
}
