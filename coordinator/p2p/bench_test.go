package p2p_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/signal-p2p/signal/node"
	"github.com/signal-p2p/signal/node/miniotest"
	"github.com/signal-p2p/signal/node/nodetest"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// Benchmarks for scripts/bench-node.sh. Figures on a shared 2-core machine
// are noisy; the script prints them and their ratios, it judges nothing.

func reportLatencies(b *testing.B, lat []time.Duration) {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) }
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
}

func noopForwardBackward(b *testing.B) []byte {
	body, err := json.Marshal(protocol.ForwardBackwardRequest{Data: []protocol.Datum{datumB(8)}})
	if err != nil {
		b.Fatal(err)
	}
	return body
}

func datumB(n int) protocol.Datum {
	toks := make([]int, n)
	w := make([]float64, n)
	for i := range toks {
		toks[i], w[i] = i+1, 1
	}
	return protocol.Datum{ModelInput: protocol.ModelInput{Tokens: toks}, LossFnInputs: protocol.LossFnInputs{TargetTokens: toks, Weights: w}}
}

// BenchmarkSessionInProcess calls the node's session manager directly: the
// baseline the network path is compared with.
func BenchmarkSessionInProcess(b *testing.B) {
	mgr := node.NewManager(node.ManagerConfig{MaxSessions: 1, Logger: quietLogger()}, &nodetest.Engine{})
	spec, _ := json.Marshal(protocol.SessionSpec{RunID: "r", BaseModel: "tiny"})
	if r := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: "init", RunID: "r", Call: protocol.CallInit, Body: spec}); r.Error != nil {
		b.Fatal(r.Error)
	}
	body := noopForwardBackward(b)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		r := mgr.Handle(context.Background(), protocol.SessionRequest{RequestID: fmt.Sprint(i), RunID: "r", Call: protocol.CallForwardBackward, Body: body})
		lat = append(lat, time.Since(t0))
		if r.Error != nil {
			b.Fatal(r.Error)
		}
	}
	reportLatencies(b, lat)
}

// BenchmarkSessionOverLibp2p sends the same call from the coordinator's
// host to a node over /signal/session/1 on loopback.
func BenchmarkSessionOverLibp2p(b *testing.B) {
	coord := startCoordinator(b, newRegistry())
	n, _ := startNode(b, coord, nodeOpts{token: "good-token"})
	waitFor(b, 10*time.Second, "node listed", func() bool { _, ok := listed(coord, n.PeerID()); return ok })
	spec, _ := json.Marshal(protocol.SessionSpec{RunID: "r", BaseModel: "tiny"})
	ctx := context.Background()
	if r, err := coord.Do(ctx, n.PeerID(), protocol.SessionRequest{RequestID: "init", RunID: "r", Call: protocol.CallInit, Body: spec}); err != nil || r.Error != nil {
		b.Fatal(err, r.Error)
	}
	body := noopForwardBackward(b)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		r, err := coord.Do(ctx, n.PeerID(), protocol.SessionRequest{RequestID: fmt.Sprint(i), RunID: "r", Call: protocol.CallForwardBackward, Body: body})
		lat = append(lat, time.Since(t0))
		if err != nil || r.Error != nil {
			b.Fatal(err, r.Error)
		}
	}
	reportLatencies(b, lat)
}

// BenchmarkNodeStartToAdvert measures from node.New to the coordinator
// listing the node (schedulable), with the node's default advert interval.
func BenchmarkNodeStartToAdvert(b *testing.B) {
	reg := newRegistry()
	coord := startCoordinator(b, reg)
	var total time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		cfg := node.DefaultConfig()
		cfg.DataDir = b.TempDir()
		cfg.ListenAddrs = loopback
		cfg.Bootstrap = coord.Addrs()
		cfg.JoinToken = "good-token"
		cfg.MDNS = false
		cfg.Logger = quietLogger()
		n, err := node.New(cfg, &nodetest.Engine{})
		if err != nil {
			b.Fatal(err)
		}
		if err := n.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		for {
			if _, ok := listed(coord, n.PeerID()); ok {
				break
			}
			if time.Since(t0) > 30*time.Second {
				b.Fatal("node never listed")
			}
			time.Sleep(5 * time.Millisecond)
		}
		total += time.Since(t0)
		b.StopTimer()
		n.Kill()
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms-to-listed")
}

const uploadBytes = 256 << 20

// BenchmarkCheckpointUploadMinIO uploads a 256 MiB checkpoint file through
// storage.SaveDir (hash, then streamed multipart PUT) to a real MinIO.
func BenchmarkCheckpointUploadMinIO(b *testing.B) {
	srv := miniotest.Start(b, "bench")
	st, err := storage.Open(srv.StorageURL("bench", "ckpt"), storage.Credentials{AccessKey: miniotest.AccessKey, SecretKey: miniotest.SecretKey})
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	writeRandom(b, filepath.Join(dir, "adapter_model.safetensors"), uploadBytes)
	b.SetBytes(uploadBytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, _, err := storage.SaveDir(context.Background(), st, dir, "r", i, "adapter"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRawPutMinIO is the `mc cp`-style baseline: one PutObject of the
// same bytes from the same file, no hashing.
func BenchmarkRawPutMinIO(b *testing.B) {
	srv := miniotest.Start(b, "bench")
	path := filepath.Join(b.TempDir(), "blob")
	writeRandom(b, path, uploadBytes)
	b.SetBytes(uploadBytes)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		_, err = srv.Client.PutObject(context.Background(), "bench", fmt.Sprintf("raw/%d", i), f, uploadBytes, minio.PutObjectOptions{ContentType: "application/octet-stream", PartSize: 16 << 20})
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
}

func writeRandom(b *testing.B, path string, n int) {
	buf := make([]byte, n)
	if _, err := rand.Read(buf); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(path, buf, 0o644); err != nil {
		b.Fatal(err)
	}
}
