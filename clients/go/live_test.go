package client_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/clipsearch/clipsearch/clients/go/clipsearchv1"
)

// The server to test: CLIPSEARCH_ADDR=host:port (CI starts one; tests/test_go_client.py).
func liveConn(t *testing.T) *grpc.ClientConn {
	t.Helper()
	addr := os.Getenv("CLIPSEARCH_ADDR")
	if addr == "" {
		t.Skip("set CLIPSEARCH_ADDR=host:port of a running clipsearch server")
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func unitVector(dim int, seed uint64) []float32 {
	rng := rand.New(rand.NewPCG(seed, 1))
	v := make([]float32, dim)
	var norm float64
	for i := range v {
		x := rng.NormFloat64()
		v[i] = float32(x)
		norm += x * x
	}
	for i := range v {
		v[i] /= float32(math.Sqrt(norm))
	}
	return v
}

func TestUpsertSearchDelete(t *testing.T) {
	conn := liveConn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	search := pb.NewSearchServiceClient(conn)
	stats, err := pb.NewAdminServiceClient(conn).Stats(ctx, &pb.StatsRequest{})
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	dim := int(stats.GetDimension())
	suite := fmt.Sprintf("go-%d", time.Now().UnixNano())
	only := &pb.Filter{MetadataEquals: map[string]string{"suite": suite}}
	captions := map[string]string{
		suite + "-red":   "a large red circle in the center on a white background",
		suite + "-blue":  "a small blue star at the top left on a black background",
		suite + "-green": "a large green square at the bottom right on a gray background",
	}
	var docs []*pb.UpsertDocument
	var ids []string
	for i, id := range []string{suite + "-red", suite + "-blue", suite + "-green"} {
		ids = append(ids, id)
		docs = append(docs, &pb.UpsertDocument{
			Id:          id,
			Text:        captions[id],
			ImageVector: &pb.Vector{Values: unitVector(dim, uint64(i+1))},
			Metadata:    map[string]string{"suite": suite},
		})
	}
	up, err := search.Upsert(ctx, &pb.UpsertRequest{Documents: docs})
	if err != nil || up.GetUpserted() != 3 {
		t.Fatalf("Upsert: %v (upserted %d)", err, up.GetUpserted())
	}

	byText, err := search.Search(ctx, &pb.SearchRequest{
		Query:  &pb.SearchRequest_Text{Text: "a red circle"},
		Target: pb.Modality_MODALITY_TEXT,
		TopK:   3,
		Filter: only,
	})
	if err != nil {
		t.Fatalf("Search by text: %v", err)
	}
	if got := byText.GetHits(); len(got) != 3 || got[0].GetId() != suite+"-red" {
		t.Fatalf("Search by text: want %s first of 3, got %v", suite+"-red", got)
	}

	byVector, err := search.Search(ctx, &pb.SearchRequest{
		Query:  &pb.SearchRequest_Vector{Vector: &pb.Vector{Values: unitVector(dim, 2)}},
		Target: pb.Modality_MODALITY_IMAGE,
		TopK:   1,
		Filter: only,
	})
	if err != nil {
		t.Fatalf("Search by vector: %v", err)
	}
	hit := byVector.GetHits()[0]
	if hit.GetId() != suite+"-blue" || hit.GetSimilarity() < 0.999 {
		t.Fatalf("Search by vector: want %s at similarity 1, got %v", suite+"-blue", hit)
	}
	if hit.GetCaption() != captions[suite+"-blue"] || hit.GetPublishTime() == nil {
		t.Fatalf("Search by vector: hit lacks caption or publish_time: %v", hit)
	}

	del, err := search.Delete(ctx, &pb.DeleteRequest{Ids: ids})
	if err != nil || del.GetDeleted() != 3 {
		t.Fatalf("Delete: %v (deleted %d)", err, del.GetDeleted())
	}
	got, err := search.Get(ctx, &pb.GetRequest{Ids: ids, AllowMissing: true})
	if err != nil || len(got.GetDocuments()) != 0 || len(got.GetMissingIds()) != 3 {
		t.Fatalf("Get after Delete: %v, %v", err, got)
	}
}

func TestErrorsCarryStatusCodes(t *testing.T) {
	conn := liveConn(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	search := pb.NewSearchServiceClient(conn)

	_, err := search.Search(ctx, &pb.SearchRequest{Query: &pb.SearchRequest_Text{Text: "x"}, TopK: 0})
	if st := status.Convert(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "top_k") {
		t.Fatalf("top_k 0: want InvalidArgument naming top_k, got %v", err)
	}
	_, err = search.Get(ctx, &pb.GetRequest{Ids: []string{"go-no-such-document"}})
	if st := status.Convert(err); st.Code() != codes.NotFound {
		t.Fatalf("Get of an unknown id: want NotFound, got %v", err)
	}
}
