package fingerprint

import (
	"context"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/signal-p2p/signal/protocol"
)

// NVMLDevice is the part of an NVML device handle the fingerprinter reads;
// nvml.Device satisfies it, and tests feed fixed data through it.
type NVMLDevice interface {
	GetName() (string, nvml.Return)
	GetUUID() (string, nvml.Return)
	GetMemoryInfo() (nvml.Memory, nvml.Return)
	GetUtilizationRates() (nvml.Utilization, nvml.Return)
	GetCudaComputeCapability() (int, int, nvml.Return)
}

// NVMLSource reads GPUs through NVML.
type NVMLSource struct {
	mu      sync.Mutex
	devices func() ([]NVMLDevice, error)
	cpu     CPUSource
	close   func()
}

// OpenNVML loads libnvidia-ml and checks that it sees a GPU. It fails with
// ErrNoNVML on a machine without the library or without GPUs.
func OpenNVML() (*NVMLSource, error) {
	if ret := nvml.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: init: %s", ErrNoNVML, nvml.ErrorString(ret))
	}
	src := NewNVMLSource(nvmlDevices)
	src.close = func() { _ = nvml.Shutdown() }
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS || n == 0 {
		src.Close()
		return nil, fmt.Errorf("%w: %d devices (%s)", ErrNoNVML, n, nvml.ErrorString(ret))
	}
	return src, nil
}

func nvmlDevices() ([]NVMLDevice, error) {
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("nvml device count: %s", nvml.ErrorString(ret))
	}
	out := make([]NVMLDevice, 0, n)
	for i := 0; i < n; i++ {
		d, ret := nvml.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("nvml device %d: %s", i, nvml.ErrorString(ret))
		}
		out = append(out, d)
	}
	return out, nil
}

// NewNVMLSource returns a source over the devices a function lists: the
// real NVML handles, or fixed test data.
func NewNVMLSource(devices func() ([]NVMLDevice, error)) *NVMLSource {
	return &NVMLSource{devices: devices}
}

// Name is SourceNVML.
func (s *NVMLSource) Name() string { return SourceNVML }

// Close releases NVML.
func (s *NVMLSource) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.close != nil {
		s.close()
		s.close = nil
	}
}

// Probe reads every GPU, plus the CPU figures (a GPU node still reports its
// cores and memory).
func (s *NVMLSource) Probe(ctx context.Context) (Devices, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cpu, _ := s.cpu.Probe(ctx)
	devs, err := s.devices()
	if err != nil {
		return cpu, err
	}
	for i, d := range devs {
		g, err := readGPU(d)
		if err != nil {
			return cpu, fmt.Errorf("gpu %d: %w", i, err)
		}
		cpu.GPUs = append(cpu.GPUs, g)
	}
	return cpu, nil
}

func readGPU(d NVMLDevice) (protocol.GPU, error) {
	var g protocol.GPU
	var ret nvml.Return
	if g.Name, ret = d.GetName(); ret != nvml.SUCCESS {
		return g, fmt.Errorf("name: %s", nvml.ErrorString(ret))
	}
	if g.UUID, ret = d.GetUUID(); ret != nvml.SUCCESS {
		return g, fmt.Errorf("uuid: %s", nvml.ErrorString(ret))
	}
	mem, ret := d.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return g, fmt.Errorf("memory: %s", nvml.ErrorString(ret))
	}
	g.MemoryTotal, g.MemoryFree = int64(mem.Total), int64(mem.Free)
	// Utilisation and compute capability are not supported on every
	// device (MIG slices, some vGPUs): report what there is.
	if u, ret := d.GetUtilizationRates(); ret == nvml.SUCCESS {
		g.Utilization = float64(u.Gpu) / 100
	}
	if major, minor, ret := d.GetCudaComputeCapability(); ret == nvml.SUCCESS {
		g.ComputeCapability = fmt.Sprintf("%d.%d", major, minor)
	}
	return g, nil
}
