package coordinator

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are one coordinator's Prometheus collectors, on a registry of its
// own so that several coordinators can share a process (tests, testnet).
type metrics struct {
	reg       *prometheus.Registry
	requests  *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	credits   prometheus.Counter
	charges   prometheus.Counter
	batchSize prometheus.Histogram
	leader    prometheus.Gauge
	moves     *prometheus.CounterVec
	// apply is the FSM's time per command, by type; applyByType holds
	// its series for the types this version knows (0: unknown), resolved
	// once so that observing one costs no label lookup.
	apply       *prometheus.HistogramVec
	applyByType [len(cmdNames)]prometheus.Observer
}

func newMetrics(c *Coordinator) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "signal_http_requests_total", Help: "API requests by route and status.",
		}, []string{"route", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "signal_http_request_duration_seconds", Help: "API request latency by route.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18),
		}, []string{"route"}),
		credits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signal_charged_microcredits_total", Help: "Micro-credits charged by this leader.",
		}),
		charges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "signal_charges_total", Help: "Billed calls committed by this leader.",
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "signal_raft_batch_commands", Help: "Commands per raft log entry.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11),
		}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "signal_raft_leader", Help: "1 while this member is the ready raft leader.",
		}),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "signal_run_moves_total", Help: "Runs moved off lost nodes, by outcome.",
		}, []string{"outcome"}),
		apply: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "signal_raft_apply_seconds", Help: "Time this member's FSM took to decode and apply one raft command, by command type.",
			// A charge applies in a few microseconds; a snapshot-sized
			// batch of runs in milliseconds.
			Buckets: prometheus.ExponentialBuckets(1e-6, 2, 20),
		}, []string{"command"}),
	}
	for t := range m.applyByType {
		name := "unknown"
		if t > int(cmdBatch) { // a batch inside a batch is not a command
			name = cmdType(t).String()
		}
		m.applyByType[t] = m.apply.WithLabelValues(name)
	}
	applied := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "signal_raft_applied_index", Help: "Index of the last raft entry applied to the FSM.",
	}, func() float64 {
		if c.raft == nil {
			return 0
		}
		return float64(c.raft.AppliedIndex())
	})
	m.reg.MustRegister(m.requests, m.duration, m.credits, m.charges, m.batchSize, m.leader, m.moves, m.apply, applied,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) observeBatch(n int) { m.batchSize.Observe(float64(n)) }

// observeApply records how long the FSM took over one command of type t.
func (m *metrics) observeApply(t cmdType, d time.Duration) {
	b := t.base()
	if int(b) >= len(m.applyByType) {
		b = 0
	}
	m.applyByType[b].Observe(d.Seconds())
}
