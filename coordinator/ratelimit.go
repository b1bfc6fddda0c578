package coordinator

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// maxLimiters bounds the per-key limiter table; past it the table resets,
// which at worst gives keys a fresh burst.
const maxLimiters = 100_000

// rateLimits holds one token bucket per API key's account.
type rateLimits struct {
	mu    sync.Mutex
	every rate.Limit
	burst int
	m     map[string]*rate.Limiter
}

func newRateLimits(perSecond float64, burst int) *rateLimits {
	return &rateLimits{every: rate.Limit(perSecond), burst: burst, m: map[string]*rate.Limiter{}}
}

// allow takes a token for key, or says how long until one is free.
func (r *rateLimits) allow(key string) (bool, time.Duration) {
	r.mu.Lock()
	l := r.m[key]
	if l == nil {
		if len(r.m) >= maxLimiters {
			r.m = map[string]*rate.Limiter{}
		}
		l = rate.NewLimiter(r.every, r.burst)
		r.m[key] = l
	}
	r.mu.Unlock()
	res := l.Reserve()
	if d := res.Delay(); d > 0 {
		res.Cancel()
		return false, d
	}
	return true, 0
}
