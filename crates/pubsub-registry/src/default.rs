//! A process-wide default registry and free functions over it, as the Go
//! package offers.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::error::{Error, Result};
use crate::registry::{Registration, Registry, RegistryBuilder};
use crate::service::{Instance, Instances, Service, Status};

static DEFAULT: ArcSwapOption<Registry> = ArcSwapOption::const_empty();
static INIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds the default registry, unless one is already set (and not closed),
/// in which case that one is returned and `builder` is dropped. Concurrent
/// callers all get the same single registry.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pubsub_registry::Result<()> {
/// use pubsub_registry::{MemoryBus, Registry, Service};
///
/// let bus = MemoryBus::new();
/// pubsub_registry::set_default(Registry::builder().memory(&bus)).await?;
/// pubsub_registry::register(Service::new("api", "127.0.0.1:8080")).await?;
/// let found = pubsub_registry::get_service("api").await?;
/// assert_eq!(found.address(), "127.0.0.1:8080");
/// pubsub_registry::close().await?;
/// # Ok(())
/// # }
/// ```
pub async fn set_default(builder: RegistryBuilder) -> Result<Registry> {
    let _once = INIT.lock().await;
    if let Some(current) = DEFAULT.load_full() {
        if !current.is_closed() {
            return Ok(Registry::clone(&current));
        }
    }
    let registry = builder.build().await?;
    DEFAULT.store(Some(Arc::new(registry.clone())));
    Ok(registry)
}

/// The default registry, or [`Error::NoDefault`] before
/// [`set_default`] (or after [`close`]).
pub fn default() -> Result<Registry> {
    match DEFAULT.load().as_deref() {
        Some(r) if !r.is_closed() => Ok(r.clone()),
        _ => Err(Error::NoDefault),
    }
}

/// [`Registry::register`] on the default registry.
pub async fn register(service: Service) -> Result<Registration> {
    default()?.register(service).await
}

/// [`Registry::unregister`] on the default registry.
pub async fn unregister(service: &Service) -> Result<()> {
    default()?.unregister(service).await
}

/// [`Registry::set_service_status`] on the default registry.
pub async fn set_service_status(service: &Service, status: Status) -> Result<()> {
    default()?.set_service_status(service, status).await
}

/// [`Registry::get_service`] on the default registry.
pub async fn get_service(name: &str) -> Result<Arc<Instance>> {
    default()?.get_service(name).await
}

/// [`Registry::get_services`] on the default registry.
pub async fn get_services(name: &str) -> Result<Instances> {
    default()?.get_services(name).await
}

/// [`Registry::observe`] on the default registry.
pub async fn observe(name: &str) -> Result<()> {
    default()?.observe(name).await
}

/// [`Registry::observe_all`] on the default registry.
pub async fn observe_all() -> Result<()> {
    default()?.observe_all().await
}

/// Closes the default registry and clears it, so that [`set_default`] can
/// build a new one.
pub async fn close() -> Result<()> {
    let _once = INIT.lock().await;
    match DEFAULT.swap(None) {
        Some(r) => r.close().await,
        None => Err(Error::NoDefault),
    }
}
