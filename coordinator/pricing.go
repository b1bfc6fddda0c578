package coordinator

import (
	"math"
	"math/bits"

	"github.com/signal-p2p/signal/protocol"
)

// perThousand is ceil(n × price / 1000) without overflow, saturating.
func perThousand(n, price int64) int64 {
	if n <= 0 || price <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(n), uint64(price))
	if hi >= 1000 {
		return math.MaxInt64
	}
	q, r := bits.Div64(hi, lo, 1000)
	if r > 0 {
		q++
	}
	if q > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(q)
}

func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// bytesPerGB is the storage price's unit.
const bytesPerGB = 1_000_000_000

// priceUsage is a call's exact cost. Checkpoint storage is charged for its
// first hour when written.
func priceUsage(p protocol.Prices, u protocol.Usage) protocol.Cost {
	credits := satAdd(satAdd(perThousand(u.TrainTokens, p.TrainMicroCreditsPer1K), perThousand(u.PrefillTokens, p.PrefillMicroCreditsPer1K)), perThousand(u.SampledTokens, p.SampleMicroCreditsPer1K))
	if u.StoredBytes > 0 && p.StorageMicroCreditsPerGBHour > 0 {
		credits = satAdd(credits, perThousand(u.StoredBytes, p.StorageMicroCreditsPerGBHour)/(bytesPerGB/1000)+1)
	}
	return protocol.Cost{MicroCredits: credits, TrainTokens: u.TrainTokens, PrefillTokens: u.PrefillTokens, SampledTokens: u.SampledTokens}
}
