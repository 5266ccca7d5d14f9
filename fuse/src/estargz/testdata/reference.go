// Generates reference.stargz with stargz-snapshotter's own estargz package (0.12.0, Debian
// golang-github-containerd-stargz-snapshotter-dev), for the interop test in ../tests.rs:
//
//   GO111MODULE=off GOPATH=/tmp/gopath:/usr/share/gocode go run reference.go reference.stargz
//
// It prints the TOC digest and the diff ID the test expects.

package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func main() {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, data []byte) {
		h.Size = int64(len(data))
		if err := tw.WriteHeader(h); err != nil {
			panic(err)
		}
		tw.Write(data)
	}
	big := make([]byte, 3000)
	for i := range big {
		big[i] = byte(i*7 + i/13)
	}
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0755}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/hello", Mode: 0644, Uid: 1, Gid: 2}, []byte("hello, world\n"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/big", Mode: 04755}, big)
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/link", Linkname: "big"}, nil)
	add(&tar.Header{Typeflag: tar.TypeLink, Name: "etc/hard", Linkname: "etc/hello"}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/.wh.gone", Mode: 0644}, nil)
	add(&tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0666, Devmajor: 1, Devminor: 3}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "x", Mode: 0600, PAXRecords: map[string]string{"SCHILY.xattr.user.k": "v"}}, []byte("xattr file"))
	tw.Close()
	rc, err := estargz.Build(io.NewSectionReader(bytes.NewReader(buf.Bytes()), 0, int64(buf.Len())),
		estargz.WithChunkSize(1024), estargz.WithPrioritizedFiles([]string{"etc/hello"}))
	if err != nil {
		panic(err)
	}
	out, _ := io.ReadAll(rc)
	rc.Close()
	os.WriteFile(os.Args[1], out, 0644)
	fmt.Println(rc.TOCDigest(), rc.DiffID())
}
