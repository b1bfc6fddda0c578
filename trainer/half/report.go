package half

import (
	"strings"

	"golang.org/x/sys/cpu"
)

// CPUFeatures lists the features that decide the engine's product paths:
// avx2, fma, avx512f, avx512_bf16, amx_bf16 (those this CPU has).
func CPUFeatures() string {
	var f []string
	for _, c := range []struct {
		has  bool
		name string
	}{
		{cpu.X86.HasAVX2, "avx2"}, {cpu.X86.HasFMA, "fma"}, {cpu.X86.HasAVX512F, "avx512f"},
		{cpu.X86.HasAVX512BF16, "avx512_bf16"}, {cpu.X86.HasAMXBF16, "amx_bf16"},
	} {
		if c.has {
			f = append(f, c.name)
		}
	}
	return strings.Join(f, " ")
}

// Engine is what `signal node fingerprint` and `signal model bench` report
// of the products this process runs.
type Engine struct {
	CPUFeatures string `json:"cpu_features"`
	// BF16Path is how BF16 matrices are multiplied (Describe).
	BF16Path string `json:"bf16_path"`
	// F16Path is how F16 matrices are multiplied.
	F16Path string `json:"f16_path"`
	// Cap is SIGNAL_ENGINE_ISA's cap, if set.
	Cap string `json:"isa_cap,omitempty"`
}

// Report describes this process's product paths.
func Report() Engine {
	return Engine{CPUFeatures: CPUFeatures(), BF16Path: Describe(BF16), F16Path: Describe(F16), Cap: isaCap()}
}
