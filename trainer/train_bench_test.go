package trainer

import (
	"context"
	"math/rand"
	"testing"
)

// BenchmarkTrainStep135M is the profiling entry point:
// go test ./trainer -run x -bench TrainStep135M -benchtime 3x -cpuprofile cpu.prof
func BenchmarkTrainStep135M(b *testing.B) {
	m, err := RandomModel(SmolLM135MConfig(), 1)
	if err != nil {
		b.Fatal(err)
	}
	defer releaseTrainArenas(m)
	s, err := NewSession(m, SessionConfig{Rank: 8, Alpha: 16})
	if err != nil {
		b.Fatal(err)
	}
	data := randomData(rand.New(rand.NewSource(3)), m.Config().VocabSize, 256)
	ctx := context.Background()
	for i := 0; i < b.N; i++ {
		if _, err := s.ForwardBackward(ctx, data, LossCrossEntropy, nil); err != nil {
			b.Fatal(err)
		}
		if _, err := s.OptimStep(ctx, adamLR(1e-4)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(256*b.N)/b.Elapsed().Seconds(), "tokens/s")
}
