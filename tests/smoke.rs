use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks};

#[tokio::test]
async fn smoke() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let svc = ServiceBuilder::new().layer(layer).service_fn(move |req: Request<Full<Bytes>>| {
        let tx = tx.clone();
        async move {
            let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
            for i in 0..3 {
                let tx = tx.clone();
                tasks.add(async move { tx.send(i).unwrap() });
            }
            tasks.add(async { Err::<(), _>("boom") });
            tasks.add(async { if true { panic!("oh no") } });
            let tx2 = tx.clone();
            tasks.add_blocking(move || tx2.send(10).unwrap());
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("hi")))
        }
    });
    let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert!(rx.try_recv().is_err());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hi");
    tokio::time::timeout(Duration::from_secs(5), handle.wait_idle()).await.unwrap();
    let got: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert_eq!(got, vec![0, 1, 2, 10]);
    let s = handle.stats();
    assert_eq!((s.completed, s.failed, s.panicked), (4, 1, 1), "{s:?}");
    let _ = service_fn(|_: ()| async { Ok::<_, Infallible>(()) });
}
