package client

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// TestnetFile is the part of the testnet.json that `signal testnet` writes
// which a client needs (issue 8). Unknown fields are ignored, so the testnet
// may add more.
type TestnetFile struct {
	Coordinators []string `json:"coordinators"`
	AdminToken   string   `json:"admin_token"`
	APIKey       string   `json:"api_key"`
	// StorageURL is the network's checkpoint store (what
	// `signal checkpoints download` reads).
	StorageURL string `json:"storage"`
}

// TestnetFileName is the file `signal testnet --dir DIR` writes in DIR.
const TestnetFileName = "testnet.json"

// ReadTestnetFile reads a testnet.json — path names the file or the
// testnet's directory that holds it — and checks it names a coordinator.
func ReadTestnetFile(path string) (*TestnetFile, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		path = filepath.Join(path, TestnetFileName)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read testnet file: %w", err)
	}
	var tf TestnetFile
	if err := json.Unmarshal(data, &tf); err != nil {
		return nil, fmt.Errorf("decode testnet file %s: %w", path, err)
	}
	if len(tf.Coordinators) == 0 || tf.Coordinators[0] == "" {
		return nil, fmt.Errorf("%w: testnet file %s: coordinators is empty", ErrInvalidArgument, path)
	}
	if tf.APIKey == "" {
		return nil, fmt.Errorf("%w: testnet file %s: api_key is empty", ErrInvalidArgument, path)
	}
	return &tf, nil
}

// FromTestnet returns a Client of every coordinator of a local testnet
// (path: its testnet.json or its directory), authenticated with the
// testnet's funded API key; calls fail over between the coordinators.
func FromTestnet(path string, opts ...Option) (*Client, error) {
	tf, err := ReadTestnetFile(path)
	if err != nil {
		return nil, err
	}
	return NewCluster(tf.Coordinators, tf.APIKey, opts...)
}
