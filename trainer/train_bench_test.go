package trainer

import (
	"context"
	"fmt"
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
	defer m.Close()
	s, err := NewSession(m, SessionConfig{Rank: 8, Alpha: 16})
	if err != nil {
		b.Fatal(err)
	}
	for _, batch := range []int{1, 4} {
		lens := make([]int, batch)
		for i := range lens {
			lens[i] = 256
		}
		data := randomData(rand.New(rand.NewSource(3)), m.Config().VocabSize, lens...)
		ctx := context.Background()
		b.Run(fmt.Sprintf("%dx256", batch), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if _, err := s.ForwardBackward(ctx, data, LossCrossEntropy, nil); err != nil {
					b.Fatal(err)
				}
				if _, err := s.OptimStep(ctx, adamLR(1e-4)); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(batch*256*b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
