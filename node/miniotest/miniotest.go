// Package miniotest starts a real MinIO server for tests: the binary named
// by $SIGNAL_MINIO_BIN (default .cache/bin/minio at the module root), on
// free loopback ports, with a temporary data directory, killed at the end of
// the test.
package miniotest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Test credentials of the servers this package starts.
const (
	AccessKey = "signaltest"
	SecretKey = "signaltest-secret"
)

// Server is a running MinIO.
type Server struct {
	Endpoint string // host:port
	Client   *minio.Client
}

// StorageURL is the s3:// URL of bucket/prefix on this server.
func (s *Server) StorageURL(bucket, prefix string) string {
	return fmt.Sprintf("s3://%s/%s?endpoint=%s&secure=false", bucket, prefix, s.Endpoint)
}

func binary() string {
	if p := os.Getenv("SIGNAL_MINIO_BIN"); p != "" {
		return p
	}
	_, file, _, _ := runtime.Caller(0)
	// node/miniotest/miniotest.go → module root.
	return filepath.Join(filepath.Dir(file), "..", "..", ".cache", "bin", "minio")
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Start runs MinIO and creates the named buckets. Without the binary it
// skips the test, except under CI=true where it fails.
func Start(t testing.TB, buckets ...string) *Server {
	t.Helper()
	bin := binary()
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("MinIO binary %s: %v (make minio builds it)", bin, err)
		}
		t.Skipf("MinIO binary %s not present (make minio builds it)", bin)
	}
	port, console := freePort(t), freePort(t)
	endpoint := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(bin, "server", t.TempDir(), "--address", endpoint,
		"--console-address", fmt.Sprintf("127.0.0.1:%d", console), "--quiet")
	cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+AccessKey, "MINIO_ROOT_PASSWORD="+SecretKey,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off")
	logf, err := os.Create(filepath.Join(t.TempDir(), "minio.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("start MinIO: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logf.Close()
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + endpoint + "/minio/health/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("MinIO at %s not ready after 60s: %v\n%s", endpoint, err, log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	client, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4(AccessKey, SecretKey, "")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, b := range buckets {
		if err := client.MakeBucket(ctx, b, minio.MakeBucketOptions{}); err != nil {
			t.Fatalf("make bucket %s: %v", b, err)
		}
	}
	return &Server{Endpoint: endpoint, Client: client}
}
