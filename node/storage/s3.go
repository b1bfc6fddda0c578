package storage

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// partBytes is the multipart part size: minio-go streams an object of
// unknown or large size in parts of this size, holding one part in memory.
const partBytes = 16 << 20

// s3Store keeps objects under a prefix of a bucket in an S3-compatible store.
type s3Store struct {
	client *minio.Client
	bucket string
	prefix string
	query  url.Values // endpoint, secure, region: reused for URIs of other buckets
	creds  Credentials
}

func openS3(u *url.URL, creds Credentials) (*s3Store, error) {
	if u.Host == "" {
		return nil, fmt.Errorf("%w: %q: missing bucket (s3://bucket/prefix)", ErrInvalidURL, u.String())
	}
	q := u.Query()
	endpoint := q.Get("endpoint")
	if endpoint == "" {
		endpoint = "s3.amazonaws.com"
	}
	secure := true
	if s := q.Get("secure"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			return nil, fmt.Errorf("%w: %q: secure=%q is not a boolean", ErrInvalidURL, u.String(), s)
		}
		secure = b
	}
	if creds.AccessKey == "" || creds.SecretKey == "" {
		return nil, fmt.Errorf("%w: %q: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or pass them)", ErrInvalidURL, u.String())
	}
	client, err := minio.New(endpoint, &minio.Options{
		Creds:  credentials.NewStaticV4(creds.AccessKey, creds.SecretKey, ""),
		Secure: secure,
		Region: q.Get("region"),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrInvalidURL, u.String(), err)
	}
	return &s3Store{
		client: client,
		bucket: u.Host,
		prefix: strings.Trim(u.Path, "/"),
		query:  q,
		creds:  creds,
	}, nil
}

func (s *s3Store) key(name string) string {
	if s.prefix == "" {
		return name
	}
	return s.prefix + "/" + name
}

// URI leaves the endpoint out: s3://bucket/key is the usual form, and a
// reader resolves it with its own endpoint and credentials.
func (s *s3Store) URI(name string) string {
	return "s3://" + s.bucket + "/" + s.key(name)
}

func (s *s3Store) Put(ctx context.Context, name string, r io.Reader, size int64) (string, error) {
	if err := checkName(name); err != nil {
		return "", err
	}
	_, err := s.client.PutObject(ctx, s.bucket, s.key(name), r, size, minio.PutObjectOptions{
		ContentType: "application/octet-stream",
		PartSize:    partBytes,
	})
	if err != nil {
		return "", fmt.Errorf("put %s: %w", s.URI(name), err)
	}
	return s.URI(name), nil
}

func (s *s3Store) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	obj, err := s.client.GetObject(ctx, s.bucket, s.key(name), minio.GetObjectOptions{})
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", s.URI(name), err)
	}
	// GetObject is lazy; Stat makes a missing object an error here rather
	// than on the first Read.
	if _, err := obj.Stat(); err != nil {
		obj.Close()
		if minio.ToErrorResponse(err).Code == minio.NoSuchKey {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, s.URI(name))
		}
		return nil, fmt.Errorf("get %s: %w", s.URI(name), err)
	}
	return obj, nil
}

func (s *s3Store) Delete(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := s.client.RemoveObject(ctx, s.bucket, s.key(name), minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("delete %s: %w", s.URI(name), err)
	}
	return nil
}
