package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

// BenchmarkBilledCalls measures the whole billed path of a realistic
// forward_backward (4 × 256 tokens, the node answering 1,024 per-token
// logprobs) through the HTTP API of a 3-member cluster: calls/s and p99
// with 16 clients, bytes of raft log per call (every entry the leader
// wrote, read back from its log store) and bytes of snapshot per call
// (the idempotency records a replay needs), with and without an
// Idempotency-Key. scripts/bench-coordinator.sh prints it.
func BenchmarkBilledCalls(b *testing.B) {
	for _, idem := range []bool{false, true} {
		b.Run("idempotency_key="+strconv.FormatBool(idem), func(b *testing.B) { benchBilled(b, idem) })
	}
}

func benchBilled(b *testing.B, idem bool) {
	const clients, seqs, seqLen = 16, 4, 256
	// The node's answer: what a real node sends back for the batch.
	answer := protocol.ForwardBackwardResponse{LossSum: 2071.25, LossMean: 2.0227, Tokens: seqs * seqLen}
	for i := 0; i < seqs; i++ {
		lp := make([]float64, seqLen)
		for j := range lp {
			lp[j] = -math.Abs(math.Sin(float64(i*seqLen+j))) * 7.3 // full-precision floats, as torch and Go print them
		}
		answer.Logprobs = append(answer.Logprobs, lp)
	}
	g := 1.25
	answer.GradNorm = &g
	answerBody, _ := json.Marshal(answer)
	backend := &fakeBackend{
		NodesFn: func() []protocol.Node {
			return []protocol.Node{{PeerID: "nodeA", CPU: protocol.CPU{Cores: 2, MemoryTotal: 8 << 30}, MaxSessions: 256, Backends: []string{"native"}}}
		},
		DoFn: func(_ context.Context, _ string, req protocol.SessionRequest) (protocol.SessionResponse, error) {
			resp := protocol.SessionResponse{RequestID: req.RequestID, Body: json.RawMessage(`{}`)}
			if req.Call == protocol.CallForwardBackward {
				resp.Body = answerBody
				resp.Usage.TrainTokens = seqs * seqLen
				resp.Figures = &protocol.Figures{LossSum: answer.LossSum, WeightSum: seqs * seqLen, Tokens: seqs * seqLen, GradNorm: &g}
			}
			return resp, nil
		},
	}
	cs := startCluster(b, 3, func(c *Config) {
		c.Backend = backend
		c.RatePerSecond, c.RateBurst = 1e9, 1<<30
		c.Models[0].ContextLength = 1024
		// hashicorp/raft's default timing, as `signal coordinator` runs:
		// the tests' fast timing can depose a leader on a loaded machine.
		c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout, c.CommitTimeout = 0, 0, 0, 0
	})
	l := leaderOf(cs)
	base := l.URL()
	post := func(path, key string, body any, hdr ...string) ([]byte, error) {
		raw, _ := json.Marshal(body)
		req, _ := http.NewRequest("POST", base+path, bytes.NewReader(raw))
		req.Header.Set("Authorization", "Bearer "+key)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		out, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode/100 != 2 {
			err = fmt.Errorf("%s: status %d: %s", path, resp.StatusCode, out)
		}
		return out, err
	}
	out, err := post("/v1/admin/keys", testAdmin, protocol.CreateKeyRequest{Credits: 1 << 50, Name: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	var k protocol.CreateKeyResponse
	_ = json.Unmarshal(out, &k)
	out, err = post("/v1/admin/join_tokens", testAdmin, protocol.JoinTokenRequest{OperatorAccount: "op"})
	if err != nil {
		b.Fatal(err)
	}
	var jt protocol.JoinTokenResponse
	_ = json.Unmarshal(out, &jt)
	if _, err := l.AdmitNode(context.Background(), "nodeA", jt.JoinToken); err != nil {
		b.Fatal(err)
	}
	// One run per client: a run's calls queue one at a time.
	runs := make([]string, clients)
	for i := range runs {
		out, err := post("/v1/runs", k.APIKey, map[string]any{"base_model": "tiny", "lora_rank": 8})
		if err != nil {
			b.Fatal(err)
		}
		var r protocol.Run
		_ = json.Unmarshal(out, &r)
		runs[i] = r.ID
	}
	var req protocol.ForwardBackwardRequest
	for i := 0; i < seqs; i++ {
		d := protocol.Datum{}
		for j := 0; j < seqLen; j++ {
			d.ModelInput.Tokens = append(d.ModelInput.Tokens, 1+(i*seqLen+j)%1000)
			d.LossFnInputs.TargetTokens = append(d.LossFnInputs.TargetTokens, 2+(i*seqLen+j)%1000)
			d.LossFnInputs.Weights = append(d.LossFnInputs.Weights, 1)
		}
		req.Data = append(req.Data, d)
	}

	first, _ := l.logs.LastIndex()
	snapBefore := snapshotBytes(b, l)
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= b.N {
					return
				}
				var hdr []string
				if idem {
					hdr = []string{"Idempotency-Key", "k" + strconv.Itoa(i)}
				}
				t0 := time.Now()
				if _, err := post("/v1/runs/"+runs[c]+"/forward_backward", k.APIKey, req, hdr...); err != nil {
					b.Error(err)
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if b.Failed() {
		return
	}
	last, _ := l.logs.LastIndex()
	var logBytes int
	for i := first + 1; i <= last; i++ {
		var e raft.Log
		if err := l.logs.GetLog(i, &e); err != nil {
			b.Fatal(err)
		}
		logBytes += len(e.Data)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "calls/s")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99_ms")
	b.ReportMetric(float64(logBytes)/float64(b.N), "log_B/call")
	b.ReportMetric(float64(snapshotBytes(b, l)-snapBefore)/float64(b.N), "snap_B/call")
	b.ReportMetric(float64(len(answerBody)), "answer_B")
}

// snapshotBytes is the size of a snapshot of c's state now.
func snapshotBytes(b *testing.B, c *Coordinator) int {
	var buf bytes.Buffer
	var err error
	c.fsm.read(func(s *State) { err = writeSnapshot(&buf, s) })
	if err != nil {
		b.Fatal(err)
	}
	return buf.Len()
}
