package client

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"

	"github.com/signal-p2p/signal/protocol"
)

// ListCheckpoints lists the checkpoints of one of the caller's runs, or of
// all of them when runID is empty, newest first.
func (c *Client) ListCheckpoints(ctx context.Context, runID string) ([]protocol.Checkpoint, error) {
	var runs []protocol.Run
	if runID != "" {
		r, err := c.GetRun(ctx, runID)
		if err != nil {
			return nil, err
		}
		runs = []protocol.Run{r.Info()}
	} else {
		rs, err := c.ListRuns(ctx)
		if err != nil {
			return nil, err
		}
		runs = rs
	}
	var all []protocol.Checkpoint
	for _, r := range runs {
		all = append(all, r.Checkpoints...)
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].CreatedAt > all[j].CreatedAt })
	return all, nil
}

// CheckpointFiles returns a checkpoint's files (by id or URI) with signed
// download URLs a coordinator serves for a few minutes.
func (c *Client) CheckpointFiles(ctx context.Context, checkpoint string) (*protocol.CheckpointFiles, error) {
	if checkpoint == "" || strings.ContainsAny(checkpoint, "?#") {
		return nil, fmt.Errorf("%w: checkpoint %q: give its id or URI", ErrInvalidArgument, checkpoint)
	}
	var out protocol.CheckpointFiles
	if err := c.do(ctx, call{method: http.MethodGet, path: "/checkpoints/" + url.PathEscape(checkpoint) + "/files", out: &out}); err != nil {
		return nil, err
	}
	return &out, nil
}

// DownloadCheckpoint writes a checkpoint's files into dir (created if
// needed) through the coordinator, each verified against its CID: a file
// whose bytes do not match is removed and the download fails. It needs no
// store credentials. It returns the files written.
func (c *Client) DownloadCheckpoint(ctx context.Context, checkpoint, dir string) ([]protocol.CheckpointFileURL, error) {
	files, err := c.CheckpointFiles(ctx, checkpoint)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	for _, f := range files.Files {
		if f.Name == "" || f.Name != filepath.Base(f.Name) || f.Name == "." || f.Name == ".." {
			return nil, fmt.Errorf("checkpoint %s: file name %q is not a plain name: refused", checkpoint, f.Name)
		}
		if err := c.fetchVerified(ctx, f, filepath.Join(dir, f.Name)); err != nil {
			return nil, err
		}
	}
	return files.Files, nil
}

func (c *Client) fetchVerified(ctx context.Context, f protocol.CheckpointFileURL, dst string) (err error) {
	want, err := cid.Decode(f.CID)
	if err != nil {
		return fmt.Errorf("file %s: cid %q: %w", f.Name, f.CID, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.URL, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("download %s: %w", f.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("download %s: %s", f.Name, resp.Status)
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(out, h), resp.Body); err != nil {
		return fmt.Errorf("download %s: %w", f.Name, err)
	}
	mh, err := multihash.Encode(h.Sum(nil), multihash.SHA2_256)
	if err != nil {
		return err
	}
	if got := cid.NewCidV1(want.Type(), mh); !got.Equals(want) {
		return fmt.Errorf("download %s: the bytes have CID %s, the checkpoint names %s", f.Name, got, want)
	}
	return nil
}

// Sampler samples one set of weights: a checkpoint's adapter, or the base
// model. It holds a run of its own (a session on a node) until Close.
type Sampler struct {
	*Run
}

// SamplerOptions say what a Sampler samples: Checkpoint (an id or URI of
// the caller's, its run's base model and rank), or BaseModel alone.
type SamplerOptions struct {
	BaseModel  string
	Checkpoint string
}

// NewSampler opens a run for sampling: with the checkpoint's adapter
// loaded, or an untrained one (which leaves the base model as it is).
func (c *Client) NewSampler(ctx context.Context, o SamplerOptions) (*Sampler, error) {
	req := protocol.CreateRunRequest{BaseModel: o.BaseModel, Name: "sampler"}
	if o.Checkpoint != "" {
		all, err := c.ListCheckpoints(ctx, "")
		if err != nil {
			return nil, err
		}
		runID := ""
		for _, cp := range all {
			if cp.ID == o.Checkpoint || cp.URI == o.Checkpoint {
				runID = cp.RunID
			}
		}
		if runID == "" {
			return nil, fmt.Errorf("%w: checkpoint %q is not one of your runs'", ErrNotFound, o.Checkpoint)
		}
		src, err := c.GetRun(ctx, runID)
		if err != nil {
			return nil, err
		}
		info := src.Info()
		rank := info.LoRARank
		req = protocol.CreateRunRequest{BaseModel: info.BaseModel, LoRARank: &rank, LoRAAlpha: &info.LoRAAlpha, TargetModules: info.TargetModules, Name: "sampler"}
	} else {
		if o.BaseModel == "" {
			return nil, fmt.Errorf("%w: give a checkpoint or a base model to sample", ErrInvalidArgument)
		}
		one := 1
		req.LoRARank = &one
	}
	r, err := c.CreateRun(ctx, req)
	if err != nil {
		return nil, err
	}
	if o.Checkpoint != "" {
		if _, err := r.LoadState(ctx, o.Checkpoint); err != nil {
			_, _ = r.Close(context.WithoutCancel(ctx))
			return nil, err
		}
	}
	return &Sampler{r}, nil
}
