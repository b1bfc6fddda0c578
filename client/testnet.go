package client

import (
	"encoding/json"
	"fmt"
	"os"
)

// TestnetFile is the part of the testnet.json that `signal testnet` writes
// which a client needs (issue 8). Unknown fields are ignored, so the testnet
// may add more.
type TestnetFile struct {
	Coordinators []string `json:"coordinators"`
	AdminToken   string   `json:"admin_token"`
	APIKey       string   `json:"api_key"`
}

// ReadTestnetFile reads a testnet.json and checks it names a coordinator and a key.
func ReadTestnetFile(path string) (*TestnetFile, error) {
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
